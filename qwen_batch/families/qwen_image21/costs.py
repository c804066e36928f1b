"""Qwen-Image-2.1's figures for the planner (`qwen_batch.memory.planner`): the names of Qwen-Image's
(`qwen_batch.families.qwen_image.costs`), with 2.1's sizes counted from the published configs. Nothing of 2.1 has
been measured on a GPU yet: its timings are Qwen-Image's measurements scaled by FLOPs (or by weight bytes, or
by layer count, as each says), its activation figures Qwen-Image's scaled to 2.1's widths. Replace them with
measurements (bench/qwen_image21.py on a GPU). The planner reaches them through the model family
(`ModelFamily.cost_constants`), never by importing this module.
"""

from qwen_batch.families.qwen_image import costs as qwen_image
from qwen_batch.memory.modes import BF16, FP8, FP8_WEIGHTS, GGUF_WEIGHTS

GiB = 2**30
MODEL_NAME = "Qwen-Image-2.1"  # in the planner's messages

# --- The model, counted on the meta device ----------------------------------------------------------
# `QwenImage21Transformer2DModel()` (diffusers 0.42.1's class defaults are the published config: 32 single-stream
# blocks 4096 wide, SwiGLU mlp_ratio 3, one shared `modulation`, no biases) built under `torch.device("meta")`, and
# `Qwen3VLForConditionalGeneration` from Qwen3-VL-8B-Instruct's config (text 4096 wide, 36 layers, MLP 12288, 32
# heads, 8 KV heads of 128, vocabulary 151,936, untied lm_head; vision depth 27, 1152 wide, MLP 4304, 16 heads,
# patch 16, merge 2, out 4096, deepstack [8, 16, 24]) under `accelerate.init_empty_weights()`; parameters summed
# per module. The same counting gives Qwen-Image's constants exactly (20,430,401,088 and 8,292,166,656).
DIT_PARAMS = 7_115_124_736
DIT_BLOCKS = 32
# One QwenImage21TransformerBlock: 7 linears (attention's q, k, v, out; the SwiGLU's proj, gate, out), QK norms.
DIT_BLOCK_PARAMS = 218_104_064
DIT_HIDDEN = 4096  # the blocks' width (32 heads of 128)
# Outside the blocks: the shared modulation Linear(4096, 16384) (67.1 M), the text input (33.6 M), the timestep
# embedding (17.8 M), norm_out (16.8 M), img_in and proj_out: 135,794,688, 1.9% of the weights.
DIT_OUTSIDE_BLOCKS_PARAMS = DIT_PARAMS - DIT_BLOCKS * DIT_BLOCK_PARAMS
# Single-stream: every token (text, condition image, target) passes through all of a block's linears.
DIT_LINEAR_PARAMS_PER_TOKEN = 4 * DIT_HIDDEN**2 + 3 * DIT_HIDDEN * 12288
# fp8 quantizes every block linear (placement.FP8_KEPT_BF16 names Qwen-Image's `img_mlp.net.2`, which 2.1's blocks
# do not have; vLLM-Omni's fp8 anchor quantizes all of them too); everything outside the blocks stays bf16.
DIT_FP8_KEPT_BF16_PARAMS = 0
DIT_FP8_SCALE_BYTES = DIT_BLOCKS * 4 * (4 * DIT_HIDDEN + 2 * 12288 + DIT_HIDDEN)  # a float32 scale per output row
# Dequantized layers are this at most: the shared modulation, Linear(4096, 16384), in bf16 (the largest block
# linears, the SwiGLU's 12288 x 4096, are smaller).
DIT_LARGEST_LINEAR_BYTES = 16384 * DIT_HIDDEN * 2
ENCODER_PARAMS = 8_767_123_696  # language model 7.57 B, vision tower 0.58 B, lm_head 0.62 B
ENCODER_LM_HEAD_PARAMS = 622_329_856  # dropped when encoding (replaced by Identity): hidden states only
ENCODER_EMBED_PARAMS = 622_329_856
VAE_PARAMS = 337_740_404  # AutoencoderKLQwenImage21's class defaults (z_dim 64, 16x, decoder base 144, RGBA)
# The 2.1 pipeline sets no limit on a prompt: plan encoding for a long one, 1024 tokens and the template's ~24.
MAX_TEXT_TOKENS = 1024 + 24
TYPICAL_TEXT_TOKENS = 256  # text tokens assumed for a denoise batch (a typical prompt is ~100-300)
# The vision tokens a condition image adds to the encoder's sequence: at about 1024x1024 (the pipeline resizes
# condition images to that area), 64 x 64 patches of 16, merged 2 x 2. 2.1 has no edit task; the planner adds
# these per condition image of a row.
EDIT_IMAGE_TEXT_TOKENS = 1024
# A condition image's latent tokens in the transformer's sequence, part of the row's prefix: at about 1024x1024,
# 64 x 64 (16x VAE, latents not patched).
CONDITION_IMAGE_TOKENS = 4096
# The prefix KV cache: after the first step each forward row keeps its prefix's (text and condition images) keys
# and values at every block, in bf16: 32 blocks x (K and V) x 4096 x 2 bytes = 512 KiB a prefix token.
PREFIX_KV_BYTES_PER_TOKEN = DIT_BLOCKS * 2 * DIT_HIDDEN * 2
# The stage-2 generator holds each row's prefix (`forward.Prefix`, kept in `generate` until the batch is decoded)
# and the `Decoder`'s copies of them, stacked per group of rows (`torch.cat`): two copies through the later steps.
PREFIX_KV_COPIES = 2
# A later step's attention concatenates a row's cached prefix keys and values with its own, a block at a time.
PREFIX_ATTENTION_BYTES_PER_ROW_TOKEN = 2 * DIT_HIDDEN * 2
# Community GGUF files of the 2.1 transformer exist, but their sizes are not known here: no GGUF suggestion
# (the planner suggests none when this is empty; 2.1 runs its own transformer only, no --transformer file).
GGUF_FILE_GB: dict[str, float] = {}
# Activations of one transformer forward per sample row per token, at the peak inside a block: Qwen-Image's
# measured 110 KiB (3072 wide, a GELU MLP of 12288: its projection and GELU output live at once) less that MLP,
# scaled to 4096 wide (residual, norms, modulated input, q/k/v, attention output), plus 2.1's SwiGLU: the gate's
# SiLU, the projection and their product, three 12288-wide tensors at once. About 155 KiB. Counted, not measured.
DIT_ACTIVATION_BYTES_PER_ROW_TOKEN = (
    qwen_image.DIT_ACTIVATION_BYTES_PER_ROW_TOKEN - 2 * 12288 * 2
) * DIT_HIDDEN // qwen_image.DIT_HIDDEN + 3 * 12288 * 2
# 2.1 rows take no step cache (the family refuses them); the name is the planner's.
FIRST_BLOCK_STATE_BYTES_PER_ROW_TOKEN = 2 * DIT_HIDDEN * 2
# VAE decode of one image, per output pixel (one image at a time). Measured on the CPU (bf16, class-default
# weights, peak RSS over the loaded model): 6,858 B/pixel at 1024x1024, where the same measurement of Qwen-Image's
# VAE gives 4,115 against the 4,096 measured on an H100. Rounded up.
VAE_DECODE_BYTES_PER_PIXEL = 7 * 1024
# 256-pixel tiles: Qwen-Image's 1.0 GiB times the ratio of the two tiled decodes measured as above at 1024x1024
# (1,017 MB against 676 MB: 1.5).
VAE_TILED_DECODE_BYTES = int(1.5 * GiB)
# The encode stage loads the VAE beside the encoder (condition images' latents); encoding one ~1024x1024 condition
# image: 2,348 B/pixel measured on the CPU as above, rounded up.
ENCODE_STAGE_VAE_BYTES = 2 * VAE_PARAMS
CONDITION_IMAGE_ENCODE_BYTES = 2400 * 1024 * 1024
# Sequential offload (accelerate) holds one leaf module at a time: the largest is the 16384x4096 modulation.
SEQUENTIAL_GPU_WEIGHT_BYTES = 4 * 16384 * DIT_HIDDEN * 2
# Qwen-Image's measured 400 KiB a token (29 kept hidden states 3584 wide, a SwiGLU of 18944, attention) with
# Qwen3-VL-8B's sizes: 37 kept hidden states 4096 wide (the pipeline asks for all of them), a SwiGLU of 12288,
# the rest scaled by width. About 466 KiB. Counted, not measured.
ENCODER_ACTIVATION_BYTES_PER_TOKEN = (
    37 * 4096 * 2
    + 3 * 12288 * 2
    + (qwen_image.ENCODER_ACTIVATION_BYTES_PER_TOKEN - 29 * 3584 * 2 - 3 * 18944 * 2) * 4096 // 3584
)
# Loading, host RAM: the transformer and VAE come through `from_pretrained`, which maps the checkpoint (a 1.9 GiB
# 2.1 transformer loaded on the CPU moved RSS by 0.02 GiB) and is placed block by block as Qwen-Image's streamed
# loader places it; 2.1's blocks are smaller (0.44 GB). The bf16 encoder loads straight to the GPU tensor by
# tensor as Qwen-Image's (its largest tensors 0.15 GB larger); mapped, 6% more pages than Qwen-Image's.
DIT_LOAD_GIB = qwen_image.DIT_LOAD_GIB
# Measured (bench/results/qwen_image21_h100.jsonl, bf16-24g-from-disk): the whole CLI run with the bf16 encoder
# loaded straight to the GPU peaked at 6.27 GiB RSS (2.98 anonymous), i.e. about 2.3 GiB over HOST_BASE_GIB's
# 4.0; 2.5 keeps a margin. (The estimate from Qwen-Image's figures was 5.2: the planner refused a 10 GiB host.)
ENCODER_LOAD_GIB = 2.5
ENCODER_MAPPED_LOAD_GIB = 3.7

# --- Speed: estimated from FLOPs, the compiled bf16 and fp8 figures measured (below) -------------
# One row-forward of REFERENCE_TOKENS tokens through the blocks: Qwen-Image's measured seconds times the ratio of
# the two models' FLOPs there (the planner's `forward_flops`: 2 x linear parameters a token passes x tokens, and
# 4 x pairs x width per block). Per token the two are close: 2.1's 32 single-stream blocks pass a token through
# 6.98 B parameters, Qwen-Image's 60 dual-stream blocks through 6.80 B (each token only its stream's half; the
# modulation runs per row). At 4,224 tokens: 68.3 TFLOP against 70.6, a ratio of 0.968. Not Qwen-Image's 20.4 B
# against 2.1's 7.0 B parameters: that ratio (0.34) would put a 2.1 step at 0.06 s, where vLLM-Omni measured
# diffusers at 0.155 s a step on an H200 (1024x1024, one row; these figures predict 0.168 s on an H100).
REFERENCE_TOKENS = qwen_image.REFERENCE_TOKENS


def _reference_flops(linear_params: int, hidden: int, blocks: int) -> float:
    return 2 * linear_params * REFERENCE_TOKENS * blocks + 4 * REFERENCE_TOKENS**2 * hidden * blocks


FORWARD_FLOPS_RATIO = _reference_flops(DIT_LINEAR_PARAMS_PER_TOKEN, DIT_HIDDEN, DIT_BLOCKS) / _reference_flops(
    qwen_image.DIT_LINEAR_PARAMS_PER_TOKEN, qwen_image.DIT_HIDDEN, qwen_image.DIT_BLOCKS
)
FORWARD_SECONDS = {key: round(seconds * FORWARD_FLOPS_RATIO, 3) for key, seconds in qwen_image.FORWARD_SECONDS.items()}
# Measured (bench/qwen_image21.py, bench/results/qwen_image21_h100.jsonl, H100, 1024x1024, 50 steps, batches of 4,
# compiled): 5.793 s per image in bf16, 4.201 s in fp8, i.e. per row-forward with each row's first step (alone, over
# its whole sequence) amortized. The eager and layerwise figures stay the FLOPs estimates above.
FORWARD_SECONDS[(BF16, True)] = round(5.793 / 50, 3)
FORWARD_SECONDS[(FP8, True)] = round(4.201 / 50, 3)
# Dequantizing the whole model once per forward goes with the blocks' weight bytes: 0.342 of Qwen-Image's.
_WEIGHTS_RATIO = DIT_BLOCKS * DIT_BLOCK_PARAMS / (qwen_image.DIT_BLOCKS * qwen_image.DIT_BLOCK_PARAMS)
DEQUANT_SECONDS_PER_FORWARD = {
    GGUF_WEIGHTS: round(qwen_image.DEQUANT_SECONDS_PER_FORWARD[GGUF_WEIGHTS] * _WEIGHTS_RATIO, 3),
    FP8_WEIGHTS: round(qwen_image.DEQUANT_SECONDS_PER_FORWARD[FP8_WEIGHTS] * _WEIGHTS_RATIO, 3),
}
# Eager torchao fp8's activation quantization is paid op by op, per quantized linear: 2.1 runs 224 a forward
# (32 x 7), Qwen-Image 780 (60 x 13).
FP8_EAGER_SECONDS_PER_FORWARD = round(qwen_image.FP8_EAGER_SECONDS_PER_FORWARD * DIT_BLOCKS * 7 / (60 * 13), 3)
# Sequential offload copies the whole model once per forward: with the weight bytes.
SEQUENTIAL_SECONDS_PER_FORWARD = round(
    qwen_image.SEQUENTIAL_SECONDS_PER_FORWARD * DIT_PARAMS / qwen_image.DIT_PARAMS, 2
)
# The encoder's FLOPs a token go with its language model's parameters less the embedding table: 6.95 B (Qwen3-VL-8B)
# against 6.53 B (Qwen2.5-VL-7B).
ENCODE_SECONDS_PER_PROMPT = round(qwen_image.ENCODE_SECONDS_PER_PROMPT * 6_946_075_648 / 6_525_621_760, 4)
