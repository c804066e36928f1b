"""A tiny, random-weight, deterministic Qwen-Image-2.1 pipeline for tests, CI and the demo.

The companion of `qwen_batch.tiny.model` (read its docstring first) for the Qwen-Image-2.1 family: the
real ``Qwen/Qwen-Image-2.1`` cannot be downloaded where the tests run, and the code only cares about
shapes and code paths, so this builds a miniature from scratch, offline, with the same guarantees:

* every component is an instance of **the same class** as in the released model (``QwenImage21Pipeline``
  with ``FlowMatchEulerDiscreteScheduler``, ``AutoencoderKLQwenImage21``, ``Qwen3VLForConditionalGeneration``,
  ``Qwen3VLProcessor`` and ``QwenImage21Transformer2DModel``), and the structural knobs of the released
  configs are kept: the VAE compresses 16x spatially (five stages, four downsamplings) and reads and writes
  **RGBA**; the transformer consumes the VAE's latents unpatched (``in_channels`` = the VAE's ``z_dim``),
  reads the text encoder's hidden states (``context_in_dim`` = its hidden size) and modulates text and
  condition images from t = 0 (``causal_condition``, which the pipeline's prefix KV cache relies on); the
  text encoder keeps grouped-query attention, interleaved multimodal RoPE and a DeepStack vision tower with
  16-pixel patches merged 2x2, so one vision token covers the 32x32 pixels of a 2x2 group of latents, which
  is what the transformer expands each vision slot into. Only widths and depths shrink, plus two departures
  that tiny sizes call for: the image processor keeps condition images down to 32x32 (the released minimum
  of 256x256 would upscale the small condition images of tests and demos, and give the transformer more
  vision slots than latents), and a few gains on the random transformer weights make the prompt and the
  condition images visibly shape the image (see `_GATE_GAIN`);
* ``write_tiny_model`` saves it in diffusers format and ``QwenImage21Pipeline.from_pretrained(DIR)`` loads
  it offline like the real thing;
* it is deterministic: the same seed gives byte-identical ``*.safetensors`` files, another seed gives other
  weights. The tokenizer is trained without randomness and does not depend on the seed.

Two flavours (`FLAVOURS`): "generate" (``Qwen/Qwen-Image-2.1``) and "turbo" (``Qwen/Qwen-Image-2.1-Turbo``,
the 8-step distillation). Turbo's weights are the same here; what differs is the configuration: its
``model_index.json`` carries ``sample_sigmas`` (`TURBO_SIGMAS`), the fixed grid the pipeline samples when
the caller passes no ``sigmas``, so that its length (8) is the step count whatever ``num_inference_steps``
says; and its scheduler neither shifts nor stretches them (shift 1, no dynamic shifting, no terminal
stretch), so they are sampled as published at every resolution. The base model's scheduler is the
Qwen-Image one (exponential dynamic shifting with the 256/0.5 and 8192/0.9 anchors, terminal 0.02).

The tokenizer. The pipeline builds its prompts from a raw template (system turn, then the user turn with
one ``<imageN><|vision_start|><|image_pad|><|vision_end|>`` per condition image, then the prompt) and drops
the system turn's hidden states; how many it drops (``_drop_idx``) it counts by rendering the system
message through the processor's chat template. The two must tokenize the system turn identically, or the
pipeline drops the wrong hidden states. So the processor carries Qwen3-VL-Instruct's chat template verbatim
(it renders the system message exactly as the raw template spells it) and the builder *asserts* that the
template's system-turn tokens are the raw prompt's leading tokens, for prompts with and without condition
images. The vocabulary is the Qwen-Image tiny model's byte-level BPE of the edit flavours (the same special
tokens at the same relative ids; template and edit-instruction words are one token each, as with the real
vocabulary). The words of 2.1's shorter system prompt are not in its corpus, so that turn takes more tokens
here than with the real vocabulary; nothing depends on that count but ``_drop_idx``, which follows it.

Importing this module is cheap: torch, diffusers, transformers and tokenizers are imported inside the
functions that need them.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

from qwen_batch.errors import ConfigError
from qwen_batch.families import EDIT
from qwen_batch.io.file_modes import apply_umask
from qwen_batch.tiny import model as qwen_tiny
from qwen_batch.weights.model_source import TINY_MODEL_SEED

if TYPE_CHECKING:
    import diffusers
    import transformers

__all__ = [
    "FLAVOURS",
    "QWEN3_VL_CHAT_TEMPLATE",
    "TINY_MODEL21_REVISION",
    "TURBO_SIGMAS",
    "build_tiny_pipeline",
    "build_tiny_processor",
    "tiny_model_revision",
    "write_tiny_model",
]

FLAVOURS = ("generate", "turbo")  # turbo: the 8-step distilled checkpoint

# `sample_sigmas` of Qwen/Qwen-Image-2.1-Turbo's model_index.json (the terminal 0 is not listed).
TURBO_SIGMAS = [1.0, 0.978453, 0.95418, 0.926626, 0.89508, 0.845148, 0.704534, 0.414568]

# Bump when the builder changes what it writes, so a tiny model cached under $QWEN_BATCH_HOME is rebuilt.
# `tiny_model_revision` also follows the Qwen-Image tiny model's revision, whose tokenizer and scheduler
# this one reuses.
TINY_MODEL21_REVISION = 1

# The tokenizer of the Qwen-Image tiny model it reuses: the edit flavours' (see the module docstring).
_TOKENIZER_TASK = EDIT

# The chat template of Qwen/Qwen3-VL-8B-Instruct (the 2.1 text encoder), verbatim: 5292 characters.
# `QwenImage21Pipeline.__init__` renders the system message through it to count the tokens to drop.
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Text encoder. Released (Qwen3-VL-8B): hidden 4096, 36 layers, 32 heads of 128, 8 KV heads, intermediate
# 12288, mrope_section [24, 20, 20] over the 64 rotary frequencies, interleaved (T, H, W, T, H, W, ...).
_TEXT_HIDDEN = 32
_TEXT_HEAD_DIM = 16
# The 8 frequencies of a 16-dim head, interleaved as released: H takes 1 and 4, W 2 and 5, T the other 4.
_MROPE_SECTION = [4, 2, 2]

# Transformer. Released: 32 layers, 32 heads of 128 (inner dim 4096), rope axes (16, 56, 56), mlp_ratio 3.
_TRANSFORMER_HEADS = 2
_TRANSFORMER_HEAD_DIM = 16  # the smallest flex attention takes
_ROPE_AXES = (4, 6, 6)  # (frame, height, width): even, summing to the head dim
# Gains applied to the freshly initialized transformer, so that the prompt and the condition images visibly
# shape the image, as they do with trained weights. With the default init they hardly do: the shared
# `modulation` maps the small timestep embedding (std ~0.1) to gates of ~0.03, so every block adds next to
# nothing (`tanh(gate) * output`) and the prediction is a near-linear function of the noise; another prompt
# moves a 128x128 image by ~0.04/255 and another condition image by ~0.01/255. Scaling the gate rows of
# `modulation` gives gates of ~0.6; the key RMS norm's gain (1.0 at init; the norms undo any scaling of the
# projections) makes attention pick among the tokens instead of averaging them all; and a larger attention
# output weighs what was picked against the residual stream. Measured at 128x128, 2 steps: another prompt moves
# the image by ~9/255, one changed word by ~4/255, a red instead of a blue condition image by ~3/255, another
# seed by ~34/255; brightness, contrast and alpha stay as they were (mean ~121, std ~33, nothing clipped).
_GATE_GAIN = 30.0
_KEY_NORM_GAIN = 8.0
_ATTENTION_OUTPUT_GAIN = 2.0

# VAE. Released: base_dim 96, decoder_base_dim 144, z_dim 64, num_res_blocks 2. dim_mult [1, 2, 4, 8, 8] and
# temperal_downsample [False, True, True, True] (16x spatial compression), the residual (avg-down/dup-up)
# blocks and the 4 image channels (RGBA) are kept. The residual blocks never halve channels, so base 2 leaves
# every RMS norm at least 2 channels; the decoder keeps the released 1.5x width.
_VAE_BASE_DIM = 2
_VAE_DECODER_BASE_DIM = 3
# Not 4: `VaeImageProcessor` would take an RGBA condition image for latents if it had `z_dim` channels.
_VAE_Z_DIM = 8

# Image processor: the released settings (2.1 ships Qwen3-VL-8B-Instruct's preprocessor_config.json: 16-pixel
# patches, 2x2 merge, temporal patch 2, mean and std 0.5, at most 16,777,216 pixels), except the minimum. The pipeline resizes each condition image to about
# `output_resolution` squared in multiples of 32 and needs the processor to keep that size (one vision token
# per 2x2 latents); the released minimum of 65,536 pixels would upscale condition images of tiny demo sizes.
# One merged patch, 32x32, is the smallest size the pipeline makes.
_IMAGE_PROCESSOR_CONFIG = {
    "patch_size": 16,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 32 * 32, "longest_edge": 16777216},
}


def _check_flavour(flavour: str) -> None:
    if flavour not in FLAVOURS:
        raise ConfigError(f"unknown Qwen-Image-2.1 tiny model flavour {flavour!r}: use one of {', '.join(FLAVOURS)}")


def _text_encoder_config(tokenizer) -> transformers.Qwen3VLConfig:
    from transformers import Qwen3VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": _TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,  # keep grouped-query attention (4 query heads per KV head released)
        "head_dim": _TEXT_HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": _MROPE_SECTION,
            "mrope_interleaved": True,
        },
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "initializer_range": 0.02,
    }
    vision_config = {
        # Released: depth 27, hidden 1152, 16 heads, intermediate 4304, a 48x48 grid of learned position
        # embeddings (interpolated to the image's patch grid), DeepStack features from blocks 8, 16 and 24.
        "depth": 2,
        "hidden_size": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": 32,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": _TEXT_HIDDEN,  # merged patches are fed to the language model
        "num_position_embeddings": 64,  # an 8x8 grid
        "deepstack_visual_indexes": [0],
        "initializer_range": 0.02,
    }
    return Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _build_text_encoder(tokenizer, seed: int):
    from transformers import Qwen3VLForConditionalGeneration

    config = _text_encoder_config(tokenizer)
    with qwen_tiny._seeded(seed):
        model = Qwen3VLForConditionalGeneration(config)
    return model.eval()


def _build_transformer(context_in_dim: int, seed: int):
    import torch
    from diffusers import QwenImage21Transformer2DModel

    with qwen_tiny._seeded(seed):
        model = QwenImage21Transformer2DModel(
            patch_size=1,
            in_channels=_VAE_Z_DIM,
            out_channels=_VAE_Z_DIM,
            num_layers=2,
            attention_head_dim=_TRANSFORMER_HEAD_DIM,
            num_attention_heads=_TRANSFORMER_HEADS,
            context_in_dim=context_in_dim,
            mlp_ratio=3,
            axes_dims_rope=_ROPE_AXES,
            eps=1e-6,
            causal_condition=True,
        )
    with torch.no_grad():
        # `modulation` emits [scale1, gate1, scale2, gate2] (the blocks' attention and MLP), inner_dim each.
        gates = model.modulation[1].weight.view(4, model.inner_dim, -1)
        gates[1::2] *= _GATE_GAIN
        for block in model.transformer_blocks:
            block.attn.norm_k.weight.fill_(_KEY_NORM_GAIN)
            block.attn.to_out[0].weight *= _ATTENTION_OUTPUT_GAIN
    return model.eval()


def _build_vae(seed: int):
    import inspect

    from diffusers import AutoencoderKLQwenImage21

    # The released per-channel latent statistics, the first `_VAE_Z_DIM` of them, so that normalizing and
    # denormalizing latents is not the identity here either.
    defaults = inspect.signature(AutoencoderKLQwenImage21.__init__).parameters
    with qwen_tiny._seeded(seed):
        model = AutoencoderKLQwenImage21(
            base_dim=_VAE_BASE_DIM,
            decoder_base_dim=_VAE_DECODER_BASE_DIM,
            z_dim=_VAE_Z_DIM,
            dim_mult=[1, 2, 4, 8, 8],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True, True],
            dropout=0.0,
            latents_mean=list(defaults["latents_mean"].default[:_VAE_Z_DIM]),
            latents_std=list(defaults["latents_std"].default[:_VAE_Z_DIM]),
            is_residual=True,
            in_channels=4,
            out_channels=4,
        )
    return model.eval()


def _build_scheduler(flavour: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = qwen_tiny._build_scheduler()  # Qwen-Image's, which 2.1's scheduler_config.json repeats
    if flavour == "turbo":
        # Turbo's scheduler samples its sigmas as they are, at every resolution (shift 1.0, no dynamic
        # shifting, as ports of the released checkpoint describe its scheduler_config.json).
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            scheduler.config, shift=1.0, use_dynamic_shifting=False, shift_terminal=None
        )
    return scheduler


def build_tiny_processor(tokenizer) -> transformers.Qwen3VLProcessor:
    """The ``Qwen3VLProcessor`` around `tokenizer`: image processor, video processor and chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    # The pipeline never feeds videos, but transformers 5 builds the video processor whenever it loads the
    # processor, so it is saved with the rest, with the released settings.
    video_processor = Qwen3VLVideoProcessor(
        **{key: _IMAGE_PROCESSOR_CONFIG[key] for key in ("patch_size", "temporal_patch_size", "merge_size")},
        size={"shortest_edge": 4096, "longest_edge": 25165824},
    )
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**_IMAGE_PROCESSOR_CONFIG),
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def _check_drop_idx(pipe) -> None:
    """Raise unless the pipeline's `_drop_idx` drops exactly the raw templates' system turn, whatever follows.

    The pipeline counts it by rendering the system message through the chat template; check the tokens that
    gives are the raw template's system turn, and that the user turn starts right after them in every prompt.
    """
    processor, tokenizer = pipe.processor, pipe.processor.tokenizer
    message = [{"role": "system", "content": [{"type": "text", "text": pipe.sys_prompt}]}]
    chat_ids = list(processor.apply_chat_template(message, tokenize=True, return_dict=False)[0])
    user_turn = pipe.prompt_template_t2i.index("<|im_start|>user\n")
    system_ids = tokenizer(pipe.prompt_template_t2i[:user_turn], add_special_tokens=False).input_ids
    if chat_ids != system_ids or len(system_ids) != pipe._drop_idx:
        raise RuntimeError(
            f"the chat template's system turn {tokenizer.convert_ids_to_tokens(chat_ids)} is not the raw template's "
            f"{tokenizer.convert_ids_to_tokens(system_ids)}"
        )
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for template in (pipe.prompt_template_t2i, pipe.prompt_template_ti2i):
        for prompt in ("A cat", " ", "一只猫", "Put the cat of picture 1 on the chair of picture 2."):
            ids = tokenizer(template.format(prompt), add_special_tokens=False).input_ids
            if ids[: pipe._drop_idx] != system_ids or ids[pipe._drop_idx] != im_start:
                raise RuntimeError(f"the system turn does not end at token {pipe._drop_idx} before {prompt!r}")
    if pipe._img_token_id != tokenizer.convert_tokens_to_ids("<|image_pad|>"):
        raise RuntimeError("<|image_pad|> is not one token")


def build_tiny_pipeline(seed: int = TINY_MODEL_SEED, flavour: str = "generate") -> diffusers.QwenImage21Pipeline:
    """Build the tiny Qwen-Image-2.1 pipeline of `flavour` (see `FLAVOURS`) on CPU, in float32.

    Each model's weights are drawn with torch seeded to `seed`; the caller's global RNG state is untouched.
    """
    from diffusers import QwenImage21Pipeline

    _check_flavour(flavour)
    tokenizer = qwen_tiny.build_tiny_tokenizer(_TOKENIZER_TASK)
    text_encoder = _build_text_encoder(tokenizer, seed)
    pipe = QwenImage21Pipeline(
        scheduler=_build_scheduler(flavour),
        vae=_build_vae(seed),
        text_encoder=text_encoder,
        processor=build_tiny_processor(tokenizer),
        transformer=_build_transformer(text_encoder.config.text_config.hidden_size, seed),
        sample_sigmas=list(TURBO_SIGMAS) if flavour == "turbo" else None,
    )
    _check_drop_idx(pipe)
    return pipe


def write_tiny_model(
    folder: str | pathlib.Path, seed: int = TINY_MODEL_SEED, flavour: str = "generate"
) -> pathlib.Path:
    """Write the tiny pipeline of `flavour` to `folder` in diffusers format (safetensors); return the folder.

    It loads with ``QwenImage21Pipeline.from_pretrained(folder)``, offline.
    """
    folder = pathlib.Path(folder)
    pipe = build_tiny_pipeline(seed, flavour)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    return apply_umask(folder, folder_itself=False)


def tiny_model_revision(flavour: str = "generate") -> str:
    """The builder revision of `flavour`'s tiny model: a cached copy built at another revision is stale."""
    _check_flavour(flavour)
    return f"{TINY_MODEL21_REVISION}.{qwen_tiny.tiny_model_revision(_TOKENIZER_TASK)}"
