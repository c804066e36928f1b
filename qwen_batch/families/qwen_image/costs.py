"""Qwen-Image's figures for the planner (`qwen_batch.memory.planner`): its sizes, counted from the published
configs, and what its stages cost, measured. The planner reaches them through the model family
(`ModelFamily.cost_constants`), never by importing this module.
"""

from qwen_batch.memory.modes import BF16, FP8, FP8_WEIGHTS, GGUF_WEIGHTS

GiB = 2**30

MODEL_NAME = "Qwen-Image"  # in the planner's messages

# --- The model (QwenImageTransformer2DModel and Qwen2.5-VL-7B, counted on the meta device) -------
DIT_PARAMS = 20_430_401_088
DIT_BLOCKS = 60
DIT_BLOCK_PARAMS = 339_831_296  # one QwenImageTransformerBlock
DIT_HIDDEN = 3072  # the blocks' width (24 heads of 128)
DIT_OUTSIDE_BLOCKS_PARAMS = DIT_PARAMS - DIT_BLOCKS * DIT_BLOCK_PARAMS  # embedders, norm_out, proj_out
# The block linears one token passes through (its stream's q/k/v/out and 4x MLP; the modulation runs once per
# row, not per token): what a forward's FLOPs count per token and block.
DIT_LINEAR_PARAMS_PER_TOKEN = 12 * DIT_HIDDEN**2
# fp8 keeps in bf16 what is known to be sensitive: the last linear of the image MLP (`img_mlp.net.2`,
# as vLLM-Omni and SGLang do), and everything outside the 60 blocks (patch and text embedders, the
# timestep embedding, the output projection), which is 0.2% of the weights.
DIT_FP8_KEPT_BF16_PARAMS = DIT_BLOCKS * (3072 * 12288 + 3072)
DIT_FP8_SCALE_BYTES = DIT_BLOCKS * 4 * (2 * 18432 + 8 * 3072 + 2 * 12288 + 3072)  # per-row float32 scales
DIT_LARGEST_LINEAR_BYTES = 18432 * 3072 * 2  # the modulation linear in bf16: dequantized layers are this at most
ENCODER_PARAMS = 8_292_166_656  # language model 7.07 B, vision tower 0.68 B, lm_head 0.54 B
ENCODER_LM_HEAD_PARAMS = 544_997_376  # dropped when encoding: the pipeline reads hidden states only
ENCODER_EMBED_PARAMS = 544_997_376
VAE_PARAMS = 126_892_531
MAX_TEXT_TOKENS = 1024 + 34  # the pipeline's limit plus the chat-template tokens it drops afterwards
TYPICAL_TEXT_TOKENS = 256  # text tokens assumed for a denoise batch (prompt and negative padded alike)
EDIT_IMAGE_TEXT_TOKENS = 1400  # the vision tokens an edit's input image adds to the text (~1024x1024)
# No condition images and no prefix KV cache (Qwen-Image-2.1's): every step runs the whole sequence, and the
# encode stage loads no VAE for text-to-image rows.
CONDITION_IMAGE_TOKENS = 0
PREFIX_KV_BYTES_PER_TOKEN = 0
PREFIX_KV_COPIES = 0
PREFIX_ATTENTION_BYTES_PER_ROW_TOKEN = 0
ENCODE_STAGE_VAE_BYTES = 0
CONDITION_IMAGE_ENCODE_BYTES = 0
# city96's GGUF files of the Qwen-Image transformer (huggingface.co/city96/Qwen-Image-gguf), in GB: what
# the planner suggests when the model's own weights do not fit a machine well.
GGUF_FILE_GB = {"Q8_0": 21.8, "Q6_K": 16.8, "Q5_K_M": 14.9, "Q4_K_M": 13.1, "Q4_0": 11.9, "Q3_K_M": 9.7}
# Activations of one transformer forward per sample row per token (image + text): the residual streams,
# q/k/v, the 4x MLP and its GELU, at the peak inside a block.
DIT_ACTIVATION_BYTES_PER_ROW_TOKEN = 110 * 1024
# Rows with a first-block step cache keep, per row and pass, two image-stream tensors across steps (the residual
# of the last full step and the tail residual; qwen_batch.pipeline.step_cache.first_block), in bf16. Computed, not measured.
FIRST_BLOCK_STATE_BYTES_PER_ROW_TOKEN = 2 * DIT_HIDDEN * 2
# VAE decode of one image, per output pixel; decoding goes one image at a time (VAE slicing).
VAE_DECODE_BYTES_PER_PIXEL = 4096
VAE_TILED_DECODE_BYTES = int(1.0 * GiB)  # 256-pixel tiles: independent of the image size
# Sequential offload (accelerate) holds one leaf module at a time: the largest is a 3072x18432 linear.
SEQUENTIAL_GPU_WEIGHT_BYTES = 4 * 18432 * 3072 * 2
ENCODER_ACTIVATION_BYTES_PER_TOKEN = 400 * 1024  # 29 kept hidden states, the MLP, attention
# Loading: the streamed loader holds one block's file pages (0.7 GB in bf16) and a block in flight; the bf16
# text encoder goes to the GPU tensor by tensor, each one's pages given back once copied. Measured on an H200
# from disk (bench/results/host_memory_h200.jsonl): peak RSS 2.3 GiB loading the transformer in bf16 or fp8,
# 4.9-5.1 GiB encoding with the bf16 encoder. An fp8 or offloaded encoder is read memory-mapped by
# transformers and placed layer by layer: 6.6 GiB of its file pages were resident at the peak (7.2 GiB RSS).
DIT_LOAD_GIB = 1.5
ENCODER_LOAD_GIB = 5.0
ENCODER_MAPPED_LOAD_GIB = 3.5
# Seconds per transformer forward per sample row, bench/results/memory_tiers_h100.jsonl.
FORWARD_SECONDS = {
    (BF16, False): 0.178,  # eager, 8 rows a forward (the recipe's 1-row forwards: 0.183)
    (BF16, True): 0.139,  # regional torch.compile
    (FP8, True): 0.118,  # torchao fp8 (dynamic activation, per-row scales), compiled, 2 rows a forward
    (FP8, False): 0.153,  # torchao fp8 eager, per row, on top of FP8_EAGER_SECONDS_PER_FORWARD
    ("fp8-storage", False): 0.286,  # layerwise casting: fp8 weights upcast per layer (an earlier H100 run)
    ("fp8-storage", True): 0.286,
}
# Weights dequantized as they are used (GGUF; fp8 weight-only): the whole model once per forward, whatever
# the batch, on top of the bf16 compute. Measured on an H200, eager, 1024x1024 (bench/results/
# host_memory_h200.jsonl): a Q4_K forward of 4 rows took 1.05-1.13 s against 4 x 0.186 s in bf16 (0.31-0.39 s
# more); fp8-offload's forward of 6 rows 1.32 s against 6 x 0.186 (0.20 s more, streaming waits included).
DEQUANT_SECONDS_PER_FORWARD = {GGUF_WEIGHTS: 0.35, FP8_WEIGHTS: 0.20}
# Eager torchao fp8 pays its activation quantization op by op, for every linear of every forward, whatever
# the batch: 0.221 s per row at 8 rows a forward (H100) but 0.685-0.77 s for a forward of 1 row (H200,
# bench/results/host_memory_h200.jsonl, fp8-24g-in-10g): about 0.55 s a forward plus 0.153 s a row. Compiled, the
# quantization fuses into the matmuls and this is gone.
FP8_EAGER_SECONDS_PER_FORWARD = 0.55
REFERENCE_TOKENS = 4096 + 128
SEQUENTIAL_SECONDS_PER_FORWARD = 7.6  # accelerate sequential CPU offload, one forward, any batch
ENCODE_SECONDS_PER_PROMPT = 0.02
