"""Turn a plain photo into a ControlNet control image (the manifest's `control_preprocess` column).

The Qwen-Image Union ControlNet reads the kind of control from the picture itself (there is no mode
argument): an edge map, a depth map or a pose skeleton, each as an ordinary RGB image. A catalogue rarely
has those at hand, so a row may name a preprocessor that makes one from the product photo in stage 1.

* `canny` is bundled: OpenCV's Canny edge detector, no weights, white edges on black, as the InstantX
  Union examples make theirs (`cv2.Canny(image, 100, 200)` on the RGB pixels, stacked to three channels).
  It needs the `control` extra: `pip install 'qwen-batch[control]'` (opencv-python-headless).
* `depth`, `softedge` and `pose` are hooks, not bundled: each needs a neural network whose weights come
  from a model hub. Make those maps beforehand with the packages named in `HOOKS` and pass them as
  `control_image`; asking for them here says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image

from qwen_batch.errors import QwenBatchError

__all__ = ["CANNY_DEFAULTS", "HOOKS", "PREPROCESSORS", "ControlPreprocessError", "check_preprocess", "preprocess"]

CONTROL_EXTRA_HINT = "pip install 'qwen-batch[control]'"

# What the Union ControlNet also understands, and where a user gets a preprocessor for it.
HOOKS = {
    "depth": "Depth-Anything (transformers' depth-estimation pipeline with depth-anything/Depth-Anything-V2-*-hf) "
    "or controlnet_aux's MidasDetector / ZoeDetector",
    "softedge": "controlnet_aux's HEDdetector or PidiNetDetector (weights from lllyasviel/Annotators)",
    "pose": "controlnet_aux's DWposeDetector (weights from yzd-v/DWPose) or OpenposeDetector (lllyasviel/Annotators)",
}

# cv2.Canny's hysteresis thresholds on the gradient magnitude: a pixel above `high_threshold` starts an
# edge, one above `low_threshold` continues it. 100/200 as the InstantX and diffusers ControlNet examples.
CANNY_DEFAULTS = {"low_threshold": 100.0, "high_threshold": 200.0}


class ControlPreprocessError(QwenBatchError):
    """A control preprocessor cannot run: unknown or not bundled, bad options, or OpenCV not installed."""


def check_preprocess(name: str, **options: Any) -> None:
    """Raise `ControlPreprocessError` unless `preprocess(name, image, **options)` can run: lets a manifest
    row be refused before any image is read or model loaded."""
    if name in HOOKS:
        raise ControlPreprocessError(
            f"control preprocessor {name!r} is a hook, not bundled with qwen-batch: its network's weights come "
            f"from a model hub. Make the {name} maps beforehand with {HOOKS[name]}, and pass them as control_image. "
            f"Bundled: {', '.join(PREPROCESSORS)}."
        )
    if name not in PREPROCESSORS:
        raise ControlPreprocessError(
            f"unknown control preprocessor {name!r}: use one of {', '.join(PREPROCESSORS)} "
            f"(hooks, not bundled: {', '.join(HOOKS)})"
        )
    _, check = PREPROCESSORS[name]
    check(options)


def preprocess(name: str, image: Image.Image, **options: Any) -> Image.Image:
    """The control image `name` (see `PREPROCESSORS`) makes of `image`: an RGB image of the same size."""
    check_preprocess(name, **options)
    run, _ = PREPROCESSORS[name]
    return run(image, **options)


def _check_canny(options: dict[str, Any]) -> None:
    unknown = set(options) - set(CANNY_DEFAULTS)
    if unknown:
        raise ControlPreprocessError(
            f"canny has no option {', '.join(sorted(unknown))}: its options are {', '.join(CANNY_DEFAULTS)}"
        )
    values = {**CANNY_DEFAULTS, **options}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10_000:
            raise ControlPreprocessError(
                f"canny {key} {value!r}: use a number from 0 to 10000 (default {CANNY_DEFAULTS[key]:g})"
            )
    if values["low_threshold"] > values["high_threshold"]:
        raise ControlPreprocessError(
            f"canny low_threshold {values['low_threshold']:g} is above high_threshold {values['high_threshold']:g}"
        )


def _canny(image: Image.Image, **options: float) -> Image.Image:
    import numpy as np

    try:
        import cv2
    except ImportError as error:
        raise ControlPreprocessError(
            f"the canny control preprocessor needs OpenCV, which is not installed ({error}): {CONTROL_EXTRA_HINT}"
        ) from error

    values = {**CANNY_DEFAULTS, **options}
    # On the RGB pixels, not a grey version: OpenCV takes the strongest channel's gradient, so a red
    # product on a green backdrop of the same brightness still has its outline. Alpha is dropped.
    pixels = np.asarray(image.convert("RGB"))
    edges = cv2.Canny(pixels, values["low_threshold"], values["high_threshold"])  # 0 or 255, one channel
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))  # uint8 HxWx3: RGB


# name -> (make the control image, check the options)
PREPROCESSORS: dict[str, tuple[Callable[..., Image.Image], Callable[[dict[str, Any]], None]]] = {
    "canny": (_canny, _check_canny),
}
