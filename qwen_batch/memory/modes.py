"""The memory modes, named once: what `--memory-mode` (and the flow's `memory_mode`) takes.

The planner (`qwen_batch.memory.planner`) chooses one per stage; placement (`qwen_batch.memory.placement`)
carries it out. Everything else compares against these names, never against spelled-out strings.
"""

AUTO = "auto"  # the planner's choice for this GPU and host RAM
BF16 = "bf16"  # resident in bf16
FP8 = "fp8"  # resident, the linears in float8
GGUF = "gguf"  # a GGUF transformer file resident, dequantized layer by layer
OFFLOAD = "offload"  # weights streamed from pinned host RAM (and disk) block by block
FP8_OFFLOAD = "fp8-offload"  # the same with fp8 weights: half the bytes to stream
SEQUENTIAL = "sequential"  # every layer copied to the GPU as it runs: the last resort

PLACEMENT_MODES = (BF16, FP8, GGUF, OFFLOAD, FP8_OFFLOAD, SEQUENTIAL)
MEMORY_MODES = (AUTO, *PLACEMENT_MODES)
STREAMING_MODES = (OFFLOAD, FP8_OFFLOAD, SEQUENTIAL)  # weights live in host memory, copied to the GPU as used
RESIDENT_MODES = (BF16, FP8, GGUF)

# The kinds of transformer weights a mode can be given (the model's own, or a --transformer file's).
FLOAT_WEIGHTS, FP8_WEIGHTS, GGUF_WEIGHTS = "float", "fp8", "gguf"
