"""Qwen-Image-2.1 through the staged pipeline (the tiny 2.1 model, CPU).

The contract: a row's image equals diffusers' `QwenImage21Pipeline` called for that row alone (its prompt, its
condition images, `torch.Generator("cpu").manual_seed(seed)`) within 2/255 per channel, alpha included, whether it
ran alone or in a batch with rows of other prompt lengths, guidance and condition images. Then: the manifest's 2.1
rules (sizes, images, Turbo's steps, guidance), RGBA files, resume, and the rows 2.1 cannot run.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qwen_batch.manifest import read_manifest
from qwen_batch.outputs.png import read_png_metadata
from qwen_batch.run.engine import RunConfig, plan_run, run
from qwen_batch.weights.model_source import resolve_model

TOLERANCE = 2  # of 255
TYPES = {
    "seed": pa.int64(),
    "num_inference_steps": pa.int64(),
    "width": pa.int64(),
    "height": pa.int64(),
    "true_cfg_scale": pa.float64(),
    "images": pa.list_(pa.string()),
}


def write_manifest(path, rows: list[dict]):
    names = list(dict.fromkeys(name for row in rows for name in row))
    table = pa.table({name: pa.array([row.get(name) for row in rows], type=TYPES.get(name)) for name in names})
    pq.write_table(table, path)
    return path


def make_image(path, size: tuple[int, int], seed: int, alpha: bool = False):
    """A smooth seeded picture (RGBA with a gradient of transparency when `alpha`)."""
    generator = np.random.default_rng(seed)
    width, height = size
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    channels = [(np.sin(x * generator.uniform(2, 8) + y * generator.uniform(2, 8) + c) + 1) * 127.5 for c in range(3)]
    if alpha:
        channels.append(x * 255)
    Image.fromarray(np.stack(channels, -1).astype(np.uint8)).save(path)
    return path


def rgba(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGBA", image.mode
        return np.asarray(image, dtype=np.int16)


def row(row_id: str, prompt: str, **overrides) -> dict:
    return {"id": row_id, "prompt": prompt, "width": 256, "height": 256, "num_inference_steps": 3, **overrides}


# Prompt lengths, guidance and condition images all differ; the batched run puts them in one batch of 256x256 rows.
ROWS = [
    row("short", "a red fox", seed=1),
    row("long", "a lighthouse on a cliff at dusk, waves below, gulls, warm light in the windows, oil paint", seed=2),
    row("guided", "a bowl of lemons", negative_prompt="blurry, dark", true_cfg_scale=3.0, seed=3),
    row("one-image", "the same scene in winter", images=["img/photo.png"], seed=4),
    row(
        "two-images",
        "the cat from picture 1 on the sofa of picture 2",
        images=["img/photo.png", "img/cut-out.png"],
        seed=5,
    ),
    row("sized-by-image", "a watercolor of it", images=["img/wide.png"], width=None, height=None, seed=6),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model):  # tiny_model: the session's QWEN_BATCH_HOME, set before this module runs
    folder = tmp_path_factory.mktemp("qwen-image-21")
    (folder / "img").mkdir()
    make_image(folder / "img" / "photo.png", (96, 64), 1)
    make_image(folder / "img" / "cut-out.png", (64, 64), 2, alpha=True)
    make_image(folder / "img" / "wide.png", (160, 96), 3)
    return folder


@pytest.fixture(scope="module")
def runs(folder):
    manifest = write_manifest(folder / "rows.parquet", ROWS)
    outputs = {}
    for batch_size in (1, 4):
        output = folder / f"out-batch{batch_size}"
        summary = run(RunConfig(str(manifest), str(output), model="tiny-2.1", batch_size=batch_size, device="cpu"))
        assert summary.exit_code == 0, summary.problems
        assert summary.generated == len(ROWS)
        outputs[batch_size] = output
    return manifest, outputs


def diffusers_alone(pipe, request, folder, **extra):
    images = []
    for url in request.images:
        with Image.open(url) as opened:
            images.append(opened.copy())
    size = {"width": request.width, "height": request.height} if request.width else {}
    guidance = {"negative_prompt": request.negative_prompt} if request.uses_cfg else {}
    return pipe(
        prompt=request.prompt,
        image=images or None,
        true_cfg_scale=request.true_cfg_scale,
        num_inference_steps=request.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        **size,
        **guidance,
        **extra,
    ).images[0]


def test_rows_match_diffusers_alone_whether_run_alone_or_batched(runs, folder):
    from diffusers import QwenImage21Pipeline

    manifest, outputs = runs
    pipe = QwenImage21Pipeline.from_pretrained(resolve_model("tiny-2.1").location, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for request in read_manifest(str(manifest), family_rules=_rules()).requests:
        reference = diffusers_alone(pipe, request, folder)
        assert reference.mode == "RGBA"
        expected = np.asarray(reference, dtype=np.int16)
        for batch_size, output in outputs.items():
            ours = rgba(output / "images" / f"{request.id}.png")
            assert ours.shape == expected.shape, (request.id, batch_size)
            assert np.abs(ours - expected).max() <= TOLERANCE, (request.id, batch_size)


def _rules():
    from qwen_batch.families.qwen_image21 import FAMILY

    return FAMILY.rows


def test_a_row_without_a_size_follows_its_last_images_aspect_ratio(runs):
    _, outputs = runs
    with Image.open(outputs[4] / "images" / "sized-by-image.png") as image:
        # 160x96 at about 1024x1024, multiples of 32: diffusers' calculate_dimensions
        assert image.size == (1312, 800)
        assert read_png_metadata((outputs[4] / "images" / "sized-by-image.png").read_bytes())["width"] == 1312


def test_results_record_condition_images_and_a_rerun_generates_nothing(runs):
    manifest, outputs = runs
    results = pq.read_table(outputs[4] / "results.parquet").to_pylist()
    by_id = {record["id"]: record for record in results}
    assert all(record["status"] == "ok" for record in results)
    assert len(by_id["two-images"]["input_sha256"]) == 2
    summary = run(RunConfig(str(manifest), str(outputs[4]), model="tiny-2.1", batch_size=4, device="cpu"))
    assert summary.generated == 0 and summary.skipped == len(ROWS)


def test_the_manifest_follows_21s_rules(folder, tmp_path):
    manifest = write_manifest(
        tmp_path / "rules.parquet",
        [
            row("ok", "fine"),
            row("odd-size", "x", width=272),
            row("too-many", "x", images=["img/photo.png"] * 5),
            row("cfg-without-negative", "x", true_cfg_scale=4.0),
            row("init", "x", init_image="img/photo.png"),
        ],
    )
    plan = plan_run(RunConfig(str(manifest), str(tmp_path / "out"), model="tiny-2.1", device="cpu"))
    reasons = {invalid.id: invalid.reason for invalid in plan.manifest.invalid}
    assert [request.id for request in plan.todo] == ["ok"]
    assert "multiple of 32: use 256 or 288" in reasons["odd-size"]
    assert "use at most 4" in reasons["too-many"]
    assert "needs a negative_prompt" in reasons["cfg-without-negative"]
    assert "text-to-image (with condition images) manifest, 5 rows, 1 valid" in plan.manifest.report()
    assert "with Qwen-Image-2.1 give the image in `images`" in reasons["init"]


def test_turbo_takes_its_steps_from_the_checkpoint(tmp_path):
    manifest = write_manifest(
        tmp_path / "turbo.parquet",
        [
            {"id": "default", "prompt": "a kite", "width": 256, "height": 256},
            {"id": "eight", "prompt": "a kite", "width": 256, "height": 256, "num_inference_steps": 8},
            {"id": "forty", "prompt": "a kite", "width": 256, "height": 256, "num_inference_steps": 40},
        ],
    )
    plan = plan_run(RunConfig(str(manifest), str(tmp_path / "out"), model="tiny-2.1-turbo", device="cpu"))
    assert {request.id: request.num_inference_steps for request in plan.todo} == {"default": 8, "eight": 8}
    assert "fixed grid of 8 sigmas" in plan.manifest.invalid[0].reason


def test_taylorseer_rows_equal_diffusers_alone_and_do_not_depend_on_their_batch(folder, tmp_path):
    """TaylorSeer per row on 2.1: a row's image equals diffusers' TaylorSeer for that row alone and does not depend
    on its batch, it computes the steps its schedule says (the first always: it caches the prefix), and it is
    not the uncached image."""
    spec = "taylorseer:interval=2,warmup=2,order=1"
    rows = [
        row("cached", "a red fox", seed=1, num_inference_steps=8, step_cache=spec),
        row("cached-image", "the same in winter", images=["img/photo.png"], seed=4, num_inference_steps=8,
            step_cache=spec),
        row("plain", "a red fox", seed=1, num_inference_steps=8),
    ]  # fmt: skip
    manifest = write_manifest(folder / "taylorseer.parquet", rows)
    outputs = {}
    for batch_size in (1, 2):
        output = tmp_path / f"b{batch_size}"
        summary = run(RunConfig(str(manifest), str(output), model="tiny-2.1", batch_size=batch_size, device="cpu"))
        assert summary.generated == 3
        outputs[batch_size] = output
    results = {record["id"]: record for record in pq.read_table(outputs[2] / "results.parquet").to_pylist()}
    # Steps 0 and 1 (warm-up), then every second one from step 3: 0, 1, 3, 5, 7.
    assert results["cached"]["steps_computed"] == 5 and results["plain"]["steps_computed"] is None
    for row_id in ("cached", "cached-image"):
        assert (
            np.abs(rgba(outputs[1] / "images" / f"{row_id}.png") - rgba(outputs[2] / "images" / f"{row_id}.png")).max()
            <= 1
        )
    cached, plain = (rgba(outputs[2] / "images" / f"{name}.png") for name in ("cached", "plain"))
    assert np.abs(cached - plain).max() > 2, "the cached row must not be the uncached image"
    # diffusers' own TaylorSeer (lite: the transformer's output extrapolated) on 2.1, for the row alone.
    from diffusers import QwenImage21Pipeline, TaylorSeerCacheConfig

    pipe = QwenImage21Pipeline.from_pretrained(resolve_model("tiny-2.1").location, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    config = TaylorSeerCacheConfig(
        cache_interval=2,
        disable_cache_before_step=2,
        max_order=1,
        use_lite_mode=True,
        taylor_factors_dtype=torch.float32,
    )
    pipe.transformer.enable_cache(config)
    for request in read_manifest(str(manifest), family_rules=_rules()).requests[:2]:
        reference = np.asarray(diffusers_alone(pipe, request, folder), dtype=np.int16)
        assert np.abs(rgba(outputs[2] / "images" / f"{request.id}.png") - reference).max() <= TOLERANCE, request.id


def test_first_block_rows_decide_alone_and_compute_what_they_say(folder, tmp_path):
    """First-block per row on 2.1 (diffusers has no FirstBlockCache for 2.1's blocks): with a threshold no step
    stays under, every step computes and the image is the uncached one; with a loose one, rows skip steps, each
    row's decisions and image the same alone as in a batch whose other rows decide otherwise."""
    rows = [
        row("always", "a red fox", seed=1, num_inference_steps=8, step_cache="first-block:1e-9"),
        row("plain", "a red fox", seed=1, num_inference_steps=8),
        row("loose-a", "a red fox", seed=1, num_inference_steps=8, step_cache="first-block:1.0"),
        row("loose-b", "a lighthouse at dusk, waves below", seed=2, num_inference_steps=8, step_cache="first-block:1.0"),
        row("loose-c", "a bowl of lemons", negative_prompt="dark", true_cfg_scale=3.0, seed=3, num_inference_steps=8,
            step_cache="first-block:1.0"),
        row("loose-d", "winter", images=["img/photo.png"], seed=4, num_inference_steps=8, step_cache="first-block:1.0"),
    ]  # fmt: skip
    manifest = write_manifest(folder / "first-block.parquet", rows)
    outputs = {}
    for batch_size in (1, 4):
        output = tmp_path / f"b{batch_size}"
        summary = run(RunConfig(str(manifest), str(output), model="tiny-2.1", batch_size=batch_size, device="cpu"))
        assert summary.generated == len(rows), summary.problems
        outputs[batch_size] = output
    results = {b: {r["id"]: r for r in pq.read_table(outputs[b] / "results.parquet").to_pylist()} for b in outputs}
    assert results[4]["always"]["steps_computed"] == 8
    image = {b: {r["id"]: rgba(outputs[b] / "images" / f"{r['id']}.png") for r in rows} for b in outputs}
    assert np.abs(image[4]["always"] - image[4]["plain"]).max() <= TOLERANCE
    loose = [f"loose-{name}" for name in "abcd"]
    computed = [results[4][row_id]["steps_computed"] for row_id in loose]
    assert all(count >= 1 for count in computed) and min(computed) < 8, computed
    assert results[4]["loose-c"]["uncond_steps_computed"] is not None
    for row_id in loose:
        assert results[1][row_id]["steps_computed"] == results[4][row_id]["steps_computed"], row_id
        assert np.abs(image[1][row_id] - image[4][row_id]).max() <= TOLERANCE, row_id
    assert np.abs(image[4]["loose-a"] - image[4]["plain"]).max() > TOLERANCE, "skipped steps must show"


def test_the_per_row_steps_of_the_offload_modes_give_the_batched_images(folder, tmp_path, monkeypatch):
    """Offload modes move each block's weights around its forward, so every step runs diffusers' forward per row
    (from the row's cached prefix) instead of the batched decoder; forced here on the CPU, the images are the
    batched path's, TaylorSeer included."""
    from qwen_batch.families.qwen_image21 import generator
    from qwen_batch.run.engine import release_generator

    rows = [ROWS[0], ROWS[2], ROWS[3], row("cached", "a red fox", seed=1, step_cache="taylorseer:interval=2,warmup=2")]
    manifest = write_manifest(folder / "per-row.parquet", rows)
    outputs = {}
    for per_row in (False, True):
        release_generator()
        monkeypatch.setattr(generator, "PER_ROW_STEPS", per_row)
        outputs[per_row] = tmp_path / f"per-row-{per_row}"
        summary = run(RunConfig(str(manifest), str(outputs[per_row]), model="tiny-2.1", batch_size=4, device="cpu"))
        assert summary.generated == len(rows), summary.problems
    release_generator()
    for row_ in rows:
        a, b = (rgba(outputs[flag] / "images" / f"{row_['id']}.png") for flag in (False, True))
        assert np.abs(a - b).max() <= TOLERANCE, row_["id"]
