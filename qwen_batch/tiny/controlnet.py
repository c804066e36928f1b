"""Tiny random-weight Qwen-Image ControlNets for tests and the demo, built from the tiny model's transformer.

The released ControlNets are large downloads (InstantX/Qwen-Image-ControlNet-Union: 5 transformer blocks,
3.5 GB in bf16), so, as for the model itself (`qwen_batch.tiny.model`), the tests use miniatures built
here, offline, of the same class (`diffusers.QwenImageControlNetModel`) and layout:

* `union` as InstantX/Qwen-Image-ControlNet-Union: the control image (edges, depth, pose...) is VAE-encoded
  and packed like the latents (64 channels), `extra_condition_channels=0`;
* `inpaint` as InstantX/Qwen-Image-ControlNet-Inpainting: the masked image's latents plus the inverted mask
  packed together (16 + 1 channels, 2x2 patches: 68 = 64 + 4), `extra_condition_channels=4`.

`QwenImageControlNetModel.from_transformer` copies the transformer's embedders and first blocks, and
zero-initialises the layers that feed the control in (`controlnet_x_embedder`) and the residuals out
(`controlnet_blocks`), as a ControlNet starts its training. Untrained, such a ControlNet changes nothing,
so a test could not tell a control that is applied from one that is dropped: those layers are drawn at
random here (fixed seed), so applying the control visibly changes the picture (scale 1 against 0: about
13/255 per pixel at 64x64, 2 steps).

What the control image *shows* barely matters, though: the tiny model's VAE encoder hardly sees image
content and its random latent distribution has a standard deviation near 1, so the encoded control is
mostly the generator's sampling noise; two opposite control images move a Union picture by under 1/255.
The Inpainting ControlNet's mask enters exactly (not through the VAE), so another mask moves it ~9/255.

The block counts keep the two ways the transformer maps residuals to its blocks (block i gets residual
`i // ceil(num_layers / len(residuals))`): the tiny transformer has 2 blocks, the Union ControlNet 1
(one residual for several blocks, as 5 for 60 released) and the Inpainting one 2 (one each).

`ensure_tiny_controlnet(kind)` writes one once under $QWEN_BATCH_HOME/models, next to the tiny model.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_batch.errors import ConfigError
from qwen_batch.io.file_modes import apply_umask

if TYPE_CHECKING:
    import diffusers

__all__ = [
    "TINY_CONTROLNET_KINDS",
    "TINY_CONTROLNET_REVISION",
    "TINY_CONTROLNET_SEED",
    "build_tiny_controlnet",
    "ensure_tiny_controlnet",
    "tiny_controlnet_revision",
    "write_tiny_controlnet",
]

# kind -> (ControlNet blocks, extra condition channels); see the module docstring.
TINY_CONTROLNET_KINDS = {"union": (1, 0), "inpaint": (2, 4)}
# Seeds the random draw of the zero-initialised layers; the copied layers come from the tiny model's seed.
TINY_CONTROLNET_SEED = 0
# Bump when the builder changes what it writes, so a tiny ControlNet cached under $QWEN_BATCH_HOME is rebuilt.
TINY_CONTROLNET_REVISION = 1
_MASK_GAIN = 4.0


def build_tiny_controlnet(
    transformer: diffusers.QwenImageTransformer2DModel, kind: str = "union", seed: int = TINY_CONTROLNET_SEED
) -> diffusers.QwenImageControlNetModel:
    """A `kind` ControlNet (see `TINY_CONTROLNET_KINDS`) for `transformer`, on CPU in float32.

    Deterministic: the same transformer and seed give the same weights; the caller's RNG is untouched.
    """
    import torch
    from diffusers import QwenImageControlNetModel

    from qwen_batch.tiny.model import _seeded

    num_layers, extra_channels = _check_kind(kind)
    config = transformer.config
    with _seeded(seed):
        built = QwenImageControlNetModel.from_transformer(
            transformer,
            num_layers=num_layers,
            # from_transformer's defaults are the released model's (24 heads of 128), not the transformer's.
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            extra_condition_channels=extra_channels,
        )
        # from_transformer keeps the transformer's whole config, arguments the ControlNet does not take
        # (loading warns about them) and the folder it came from (config.json would differ from one
        # machine to the next) included; keep the ControlNet's own arguments, as the released config.json.
        accepted = inspect.signature(QwenImageControlNetModel.__init__).parameters
        controlnet = QwenImageControlNetModel.from_config({k: v for k, v in built.config.items() if k in accepted})
    controlnet.load_state_dict(built.state_dict())

    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for layer in (controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks):
            # nn.Linear's own initialisation (uniform within 1/sqrt(fan_in)), drawn from our generator:
            # residuals about as large as the hidden states they are added to, so the control shows.
            bound = layer.in_features**-0.5
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
        if extra_channels:
            # The inpainting condition packs 17 latent channels 2x2, channel-major: the mask is the last 4
            # inputs. It is exact (0 or 1) where the tiny VAE's latents are mostly sampling noise, so a
            # stronger mask lets a test see which mask a row got (another mask moves the image ~9/255, ~4 at 1).
            controlnet.controlnet_x_embedder.weight[:, -extra_channels:] *= _MASK_GAIN
    return controlnet.eval()


def write_tiny_controlnet(
    directory: str | Path,
    kind: str = "union",
    seed: int = TINY_CONTROLNET_SEED,
    model_folder: str | Path | None = None,
) -> Path:
    """Write a `kind` ControlNet for the tiny model in `model_folder` (default: the cached `tiny` model) to
    `directory` with `save_pretrained` (safetensors); `QwenImageControlNetModel.from_pretrained` loads it."""
    from diffusers import QwenImageTransformer2DModel

    from qwen_batch.weights.model_source import ensure_tiny_model

    _check_kind(kind)
    directory = Path(directory)
    transformer = QwenImageTransformer2DModel.from_pretrained(
        model_folder or ensure_tiny_model(), subfolder="transformer", use_safetensors=True
    )
    controlnet = build_tiny_controlnet(transformer, kind, seed)
    directory.mkdir(parents=True, exist_ok=True)
    controlnet.save_pretrained(directory, safe_serialization=True)
    return apply_umask(directory, folder_itself=False)


def tiny_controlnet_revision() -> str:
    """The builder revision: the tiny model's (its transformer is copied) and this module's."""
    from qwen_batch.tiny.model import tiny_model_revision

    return f"{tiny_model_revision()}.{TINY_CONTROLNET_REVISION}"


def ensure_tiny_controlnet(kind: str = "union") -> Path:
    """The folder of the tiny `kind` ControlNet, written once; concurrent first uses race safely to one result.

    The folder name carries the builder's revision, so a changed builder (or tiny model) writes a new one.
    """
    from qwen_batch.weights.model_source import qwen_batch_home, write_once

    _check_kind(kind)
    name = f"tiny-qwen-image-controlnet-{kind}-r{tiny_controlnet_revision()}-seed{TINY_CONTROLNET_SEED}"
    target = qwen_batch_home() / "models" / name
    return write_once(target, "config.json", lambda staging: write_tiny_controlnet(staging, kind, TINY_CONTROLNET_SEED))


def _check_kind(kind: str) -> tuple[int, int]:
    if kind not in TINY_CONTROLNET_KINDS:
        raise ConfigError(f"unknown tiny ControlNet kind {kind!r}: use one of {', '.join(TINY_CONTROLNET_KINDS)}")
    return TINY_CONTROLNET_KINDS[kind]
