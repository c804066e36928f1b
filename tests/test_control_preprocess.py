"""Control-image preprocessing: canny through OpenCV, clear errors for what is unknown or not bundled."""

from __future__ import annotations

import builtins
import sys

import numpy as np
import pytest
from PIL import Image

from qwen_batch.errors import QwenBatchError
from qwen_batch.pipeline.conditions.control_preprocess import ControlPreprocessError, check_preprocess, preprocess

SIZE = (96, 64)  # width, height: not square, so a swapped width and height shows
BOX = (24, 16, 72, 48)  # left, top, right, bottom of the square


def white_square(mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", SIZE, (0, 0, 0))
    image.paste((255, 255, 255), BOX)
    return image.convert(mode)


def distance_to_border() -> np.ndarray:
    """Each pixel's distance (in pixels, chessboard) to the square's outline."""
    left, top, right, bottom = BOX
    ys, xs = np.mgrid[0 : SIZE[1], 0 : SIZE[0]]
    inside = (xs >= left) & (xs < right) & (ys >= top) & (ys < bottom)
    to_edge_inside = np.minimum.reduce([xs - left, right - 1 - xs, ys - top, bottom - 1 - ys])
    to_edge_outside = np.maximum.reduce([left - xs, xs - (right - 1), top - ys, ys - (bottom - 1)])
    return np.where(inside, to_edge_inside, to_edge_outside)


def edges(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)
    assert set(np.unique(pixels)) <= {0, 255}, "edges are white on black"
    assert (pixels == pixels[:, :, :1]).all(), "the three channels are the same"
    return pixels[:, :, 0] == 255


def assert_outlines_the_square(found: np.ndarray) -> None:
    assert not found[distance_to_border() > 1].any(), "edges only on the square's border, none inside or outside it"
    # Every row and column the square spans has an edge pixel on each side (Canny rounds the corners off).
    left, top, right, bottom = BOX
    rows, columns = slice(top + 2, bottom - 2), slice(left + 2, right - 2)
    for side in (found[rows, left - 1 : left + 1], found[rows, right - 1 : right + 1]):
        assert side.any(axis=1).all(), "the outline has a gap"
    for side in (found[top - 1 : top + 1, columns], found[bottom - 1 : bottom + 1, columns]):
        assert side.any(axis=0).all(), "the outline has a gap"


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_canny_outlines_the_square_and_nothing_else_keeping_the_size(mode):
    result = preprocess("canny", white_square(mode))
    assert result.size == SIZE and result.mode == "RGB"
    assert_outlines_the_square(edges(result))


def test_canny_sees_an_outline_of_colour_alone():
    # Red and green of the same brightness: a grey-level detector sees nothing, the product keeps its outline.
    image = Image.new("RGB", SIZE, (0, 102, 0))
    image.paste((200, 0, 0), BOX)
    assert np.ptp(np.asarray(image.convert("L")).astype(int)) <= 1, "the colours must be equally bright"
    assert_outlines_the_square(edges(preprocess("canny", image)))


def test_canny_thresholds_decide_which_edges_count():
    faint = Image.new("L", SIZE, 0)
    # A step of 30 grey levels: Sobel's response is 4 x 30 = 120, under the default high threshold (200)
    # that an edge must reach somewhere to be kept.
    faint.paste(30, BOX)
    assert not edges(preprocess("canny", faint)).any()
    assert edges(preprocess("canny", faint, low_threshold=20, high_threshold=40)).any()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"low_threshold": 300}, "low_threshold 300 is above high_threshold 200"),
        ({"high_threshold": -1}, "high_threshold -1: use a number from 0 to 10000"),
        ({"low_threshold": "100"}, "low_threshold '100'"),
        ({"sigma": 2}, "canny has no option sigma: its options are low_threshold, high_threshold"),
    ],
)
def test_bad_canny_options_are_refused_before_any_image_is_read(options, message):
    with pytest.raises(ControlPreprocessError, match=message):
        check_preprocess("canny", **options)
    with pytest.raises(ControlPreprocessError, match=message):
        preprocess("canny", white_square(), **options)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ControlPreprocessError, match=r"unknown control preprocessor 'sobel': use one of canny") as info:
        preprocess("sobel", white_square())
    assert isinstance(info.value, QwenBatchError), "the CLI and flows turn it into a message"
    assert "depth" in str(info.value) and "pose" in str(info.value)


@pytest.mark.parametrize(("name", "provider"), [("depth", "Depth-Anything"), ("pose", "DWposeDetector")])
def test_depth_and_pose_are_hooks_naming_their_packages(name, provider):
    with pytest.raises(ControlPreprocessError) as info:
        preprocess(name, white_square())
    message = str(info.value)
    assert "not bundled" in message and "controlnet_aux" in message and provider in message
    assert "control_image" in message, "says what to do instead"


def test_without_opencv_the_error_names_the_extra(monkeypatch):
    monkeypatch.delitem(sys.modules, "cv2", raising=False)
    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("No module named 'cv2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    with pytest.raises(ControlPreprocessError, match=r"pip install 'qwen-batch\[control\]'"):
        preprocess("canny", white_square())
