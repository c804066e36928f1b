"""LoRA adapters and a fixed sampling shift (the Lightning recipe), text-to-image, on the tiny model.

The contract: a row with adapters and a shift equals diffusers' `QwenImagePipeline` with the same
adapters loaded through `load_lora_weights` and `set_adapters(names, weights)`, the scheduler built
with `base_shift = max_shift = ln(shift)` and `shift_terminal = None`, and the row's CPU generator,
within 2/255 per pixel, alone and batched, whatever other adapter sets the run has. Then: adapters in
the diffusers, kohya, ComfyUI and DiffSynth layouts, each set fused once per run, unusable adapters
make only their rows invalid before any model loads, changed adapters regenerate their rows, and the
results and PNGs say what was used.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from qwen_batch.adapters.loras import LoraRef, parse_lora_option, run_lora
from qwen_batch.cli import main
from qwen_batch.errors import ConfigError, ManifestError
from qwen_batch.manifest import read_manifest
from qwen_batch.outputs.png import PARAMETERS_KEY, read_png_metadata
from qwen_batch.run.engine import RunConfig, plan_run, run
from qwen_batch.tiny.lora import lora_state_dict, random_factors, write_lora, write_tiny_lora
from tests.support import (
    differing_images,
    diffusers_adapters,
    diffusers_reference,
    fa4_layout,
    pixels,
    small_row,
    write_manifest,
)

TOLERANCE = 2  # of 255


def lora(path: str, scale: float = 1.0) -> dict:
    return {"path": path, "scale": scale}


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model):
    """One change written in four layouts (`style-*`), and two other adapters."""
    folder = tmp_path_factory.mktemp("loras")
    for layout in ("diffusers", "kohya", "comfyui", "diffsynth"):
        write_tiny_lora("tiny", folder / f"style-{layout}.safetensors", rank=4, layout=layout, seed=1)
    write_tiny_lora("tiny", folder / "detail.safetensors", rank=8, layout="comfyui", seed=2)
    write_tiny_lora("tiny", folder / "lightning.safetensors", rank=4, layout="kohya", seed=3)
    return folder


PROMPT = "A red fox running through a snowy birch forest under a full moon"
ROWS = [
    small_row("style", PROMPT, seed=1, loras=[lora("style-diffusers.safetensors")]),
    small_row("plain", PROMPT, seed=1),
    small_row("style-kohya", PROMPT, seed=1, loras=[lora("style-kohya.safetensors")]),
    small_row("style-comfyui", PROMPT, seed=1, loras=[lora("style-comfyui.safetensors")]),
    small_row("style-diffsynth", PROMPT, seed=1, loras=[lora("style-diffsynth.safetensors")]),
    small_row("mix", "a cat", negative_prompt="blurry", seed=2, loras=[lora("detail.safetensors", 0.7), lora("style-diffusers.safetensors", -0.5)]),
    small_row("lightning", PROMPT, seed=3, true_cfg_scale=1.0, num_inference_steps=4, scheduler_shift=3.0, loras=[lora("lightning.safetensors")]),
    small_row("style-2", "一只在月光下奔跑的狐狸", seed=4, loras=[lora("style-diffusers.safetensors")]),
    small_row("shifted", PROMPT, seed=5, scheduler_shift=2.5),
    small_row("plain-2", "a desert caravan at sunset", seed=5, width=384),
    small_row("half", PROMPT, seed=1, loras=[lora("style-diffusers.safetensors", 0.5)]),
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(loras):
    manifest = write_manifest(loras / "m.parquet", ROWS)
    outputs, summaries = {}, {}
    for batch_size in (1, 4):
        output = loras / f"batch{batch_size}"
        summaries[batch_size] = run(RunConfig(str(manifest), str(output), batch_size=batch_size, device="cpu"))
        assert summaries[batch_size].exit_code == 0, summaries[batch_size].problems
        assert summaries[batch_size].generated == len(ROWS)
        outputs[batch_size] = output
    return manifest, outputs, summaries


def test_rows_with_adapters_and_shifts_match_diffusers_alone_and_batched(runs, tiny_model):
    from diffusers import QwenImagePipeline

    manifest, outputs, _ = runs
    pipe = QwenImagePipeline.from_pretrained(str(tiny_model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for request in read_manifest(str(manifest)).requests:
        with diffusers_adapters(pipe, request):
            reference = pixels(diffusers_reference(pipe, request))
        for batch_size, output in outputs.items():
            ours = pixels(output / "images" / f"{request.id}.png")
            assert np.abs(ours - reference).max() <= TOLERANCE, (request.id, batch_size)


def test_adapters_fuse_the_same_with_the_text_stream_packed(runs, tmp_path, monkeypatch):
    """Packing swaps the class of each block's text modulation (qwen_batch.families.qwen_image.packed_text); the adapters,
    which target those modules by name too, still fuse into them: every row as on the padded path."""
    manifest, outputs, _ = runs
    packs = fa4_layout(monkeypatch, packed=True)
    summary = run(RunConfig(str(manifest), str(tmp_path / "out"), batch_size=4, device="cpu"))
    assert summary.exit_code == 0 and summary.generated == len(ROWS), summary.problems
    assert packs
    assert not differing_images([row["id"] for row in ROWS], tmp_path / "out", outputs[4], TOLERANCE)


def test_the_same_adapter_in_every_layout_makes_the_same_image(runs):
    _, outputs, _ = runs
    style = pixels(outputs[4] / "images" / "style.png")
    for layout in ("kohya", "comfyui", "diffsynth"):
        assert np.abs(pixels(outputs[4] / "images" / f"style-{layout}.png") - style).max() <= TOLERANCE, layout


def test_adapters_and_scales_really_change_the_image(runs):
    """Guards the tests above: an adapter that changed nothing would pass them."""
    _, outputs, _ = runs
    image = {name: pixels(outputs[4] / "images" / f"{name}.png") for name in ("plain", "style", "half")}
    assert np.abs(image["style"] - image["plain"]).max() > 20
    assert np.abs(image["half"] - image["style"]).max() > 10
    assert np.abs(image["half"] - image["plain"]).max() > 10


def test_each_adapter_set_is_fused_once_whatever_the_row_order(runs):
    _, _, summaries = runs
    # style (1.0), style-kohya, style-comfyui, style-diffsynth, mix, lightning, half: seven sets, each
    # fused once although "style" rows are spread over the manifest and batches hold one row.
    for summary in summaries.values():
        assert summary.denoise.adapter_fuses == 7


def test_results_and_pngs_say_which_adapters_and_shift_were_used(runs, loras):
    _, outputs, _ = runs
    results = {row["id"]: row for row in pq.read_table(outputs[4] / "results.parquet").to_pylist()}
    sha = hashlib.sha256((loras / "detail.safetensors").read_bytes()).hexdigest()
    style_sha = hashlib.sha256((loras / "style-diffusers.safetensors").read_bytes()).hexdigest()
    assert results["mix"]["loras"] == [
        {"path": str(loras / "detail.safetensors"), "scale": 0.7, "sha256": sha},
        {"path": str(loras / "style-diffusers.safetensors"), "scale": -0.5, "sha256": style_sha},
    ]
    assert results["plain"]["loras"] is None and results["plain"]["scheduler_shift"] is None
    assert results["lightning"]["scheduler_shift"] == 3.0
    png = outputs[4] / "images" / "mix.png"
    metadata = read_png_metadata(png.read_bytes())
    assert [entry["sha256"] for entry in metadata["loras"]] == [sha, style_sha]
    with Image.open(png) as image:
        text = image.text[PARAMETERS_KEY]
    assert text.splitlines()[0] == "a cat <lora:detail:0.7> <lora:style-diffusers:-0.5>"
    assert f'Lora hashes: "detail: {sha[:10]}, style-diffusers: {style_sha[:10]}"' in text
    with Image.open(outputs[4] / "images" / "lightning.png") as image:
        assert "Schedule shift: 3.0" in image.text[PARAMETERS_KEY]


def test_a_changed_adapter_file_regenerates_only_its_rows(tmp_path, tiny_model):
    write_tiny_lora("tiny", tmp_path / "a.safetensors", seed=1)
    write_tiny_lora("tiny", tmp_path / "b.safetensors", seed=2)
    rows = [
        small_row("uses-a", "a fox", seed=1, loras=[lora("a.safetensors")]),
        small_row("uses-b", "a fox", seed=1, loras=[lora("b.safetensors")]),
        small_row("none", "a fox", seed=1),
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    config = RunConfig(str(manifest), str(tmp_path / "out"), device="cpu")
    first = run(config)
    assert first.generated == 3
    before = (tmp_path / "out" / "images" / "uses-a.png").read_bytes()

    write_tiny_lora("tiny", tmp_path / "a.safetensors", seed=7)  # same path, new content
    second = run(config)
    assert (second.generated, second.skipped) == (1, 2)
    assert (tmp_path / "out" / "images" / "uses-a.png").read_bytes() != before
    third = run(config)
    assert (third.generated, third.skipped) == (0, 3)


def write_bad_adapters(folder):
    import pickle

    (folder / "pickled.safetensors").write_bytes(pickle.dumps({"lora_A": [1, 2, 3]}))
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "a-folder.safetensors").mkdir()
    other_model = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)}
    other_model["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.zeros(320, 4)
    write_lora(other_model, folder / "sdxl.safetensors")
    bigger = {name: (2 * inputs, outputs) for name, (inputs, outputs) in _tiny_layout().items()}
    write_lora(lora_state_dict(random_factors(bigger, 4), "diffusers"), folder / "bigger.safetensors")
    write_tiny_lora("tiny", folder / "good.safetensors")


def _tiny_layout():
    from qwen_batch.adapters.loras import transformer_layout
    from qwen_batch.weights.model_source import resolve_model

    return transformer_layout(resolve_model("tiny"))


def test_unusable_adapters_make_only_their_rows_invalid_before_any_model_loads(tmp_path, tiny_model, monkeypatch):
    manifest_folder = tmp_path / "job"
    manifest_folder.mkdir()
    write_bad_adapters(manifest_folder)
    write_tiny_lora("tiny", tmp_path / "outside.safetensors")
    cases = {
        "missing": ("missing.safetensors", "not found"),
        "pickled": ("pickled.safetensors", "not a safetensors file"),
        "empty": ("empty.safetensors", "not a safetensors file"),
        "folder": ("a-folder.safetensors", "is a folder"),
        "sdxl": ("sdxl.safetensors", "matches no layer of this model's transformer"),
        "bigger": ("bigger.safetensors", "does not fit layer transformer_blocks.0"),
        "outside": ("../outside.safetensors", "outside the allowed input locations"),
    }
    rows = [small_row(name, "a fox", loras=[lora(path)]) for name, (path, _) in cases.items()]
    rows.append(small_row("good", "a fox", loras=[lora("good.safetensors")]))
    manifest = write_manifest(manifest_folder / "m.parquet", rows)
    config = RunConfig(str(manifest), str(tmp_path / "out"), device="cpu")

    import qwen_batch.weights.model_source

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded while planning")

    with monkeypatch.context() as patched:
        patched.setattr(qwen_batch.weights.model_source, "load_pipeline", no_loading)
        plan = plan_run(config)
    reasons = {row.id: row.reason for row in plan.manifest.invalid}
    assert set(reasons) == set(cases)
    for name, (path, reason) in cases.items():
        assert reason in reasons[name], (name, reasons[name])
        assert reasons[name].startswith("loras[0]") and path.removeprefix("../") in reasons[name], reasons[name]
    assert [request.id for request in plan.todo] == ["good"]

    summary = run(config)
    assert (summary.generated, summary.invalid, summary.exit_code) == (1, len(cases), 1)
    results = {row["id"]: row for row in pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()}
    assert results["good"]["status"] == "ok"
    assert results["sdxl"]["status"] == "invalid" and results["sdxl"]["loras"][0]["path"].endswith("sdxl.safetensors")


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"loras": [lora("x.safetensors", 11.0)]}, "loras[0].scale 11.0 is out of range"),
        ({"loras": [{"path": " ", "scale": 1.0}]}, "loras[0].path is empty"),
        ({"loras": [lora("x.safetensors"), lora("./x.safetensors")]}, "more than once"),
        ({"loras": [lora(f"{n}.safetensors") for n in range(9)]}, "use at most 8"),
        ({"scheduler_shift": 0.0}, "scheduler_shift 0.0 is out of range"),
        ({"scheduler_shift": float("nan")}, "scheduler_shift nan is out of range"),
    ],
)
def test_bad_adapter_and_shift_values_are_row_problems(tmp_path, row, reason):
    rows = [small_row("bad", "a fox", **row), small_row("good", "a fox")]
    manifest = read_manifest(str(write_manifest(tmp_path / "m.parquet", rows)))
    assert [request.id for request in manifest.requests] == ["good"]
    assert reason in manifest.invalid[0].reason


def test_a_loras_column_of_the_wrong_type_is_a_manifest_error(tmp_path):
    import pyarrow as pa

    table = pa.table({"id": ["a"], "prompt": ["a fox"], "loras": pa.array([["x.safetensors"]])})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(
        ManifestError,
        match=r"column 'loras' has type list<.*string>; it must be a list of structs \{path: string, scale: number\}",
    ):
        read_manifest(str(tmp_path / "m.parquet"))


def test_lists_of_dicts_as_pyarrow_and_pandas_write_them_are_read(tmp_path):
    import pyarrow as pa

    rows = [{"id": "a", "prompt": "p", "loras": [{"path": "x.safetensors", "scale": 0.5}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")  # what pandas' to_parquet writes too
    (request,) = read_manifest(str(tmp_path / "m.parquet")).requests
    assert request.loras == (LoraRef(str(tmp_path / "x.safetensors"), 0.5),)


def test_lora_options_take_a_scale_after_the_last_colon(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_lora_option("style.safetensors") == LoraRef(str(tmp_path / "style.safetensors"), 1.0)
    assert parse_lora_option("style.safetensors:0.8") == LoraRef(str(tmp_path / "style.safetensors"), 0.8)
    assert parse_lora_option("s3://b/l/x.safetensors") == LoraRef("s3://b/l/x.safetensors", 1.0)
    assert parse_lora_option("s3://b/l/x.safetensors:-1.5") == LoraRef("s3://b/l/x.safetensors", -1.5)
    with pytest.raises(ConfigError, match=r"scale 20\.0 is out of range"):
        parse_lora_option("x.safetensors:20")
    with pytest.raises(ConfigError, match="give the adapter's path"):
        run_lora(" ")


def test_run_wide_adapters_and_shift_fill_the_rows_that_name_none(tmp_path, tiny_model, capsys):
    write_tiny_lora("tiny", tmp_path / "everyone.safetensors", seed=1)
    write_tiny_lora("tiny", tmp_path / "own.safetensors", seed=2)
    rows = [
        small_row("default", "a fox", true_cfg_scale=1.0, num_inference_steps=4),
        small_row("own", "a fox", loras=[lora("own.safetensors", 0.3)], scheduler_shift=1.5),
    ]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    code = main(
        [
            *("run", str(manifest), "-o", str(out), "--device", "cpu", "-q", "--no-progress"),
            *("--lora", f"{tmp_path / 'everyone.safetensors'}:0.8", "--scheduler-shift", "3"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "adapters" in capsys.readouterr().out  # the summary counts the sets fused
    results = {row["id"]: row for row in pq.read_table(out / "results.parquet").to_pylist()}
    assert [(entry["path"], entry["scale"]) for entry in results["default"]["loras"]] == [
        (str(tmp_path / "everyone.safetensors"), 0.8)
    ]
    assert results["default"]["scheduler_shift"] == 3.0
    assert [(entry["path"], entry["scale"]) for entry in results["own"]["loras"]] == [
        (str(tmp_path / "own.safetensors"), 0.3)
    ]
    assert results["own"]["scheduler_shift"] == 1.5


def test_a_bad_lora_option_is_a_usage_error(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a fox")])
    assert main(["run", str(manifest), "-o", str(tmp_path / "o"), "--lora", "x.safetensors:99"]) == 2
    assert "scale 99.0 is out of range" in capsys.readouterr().err
    assert main(["run", str(manifest), "-o", str(tmp_path / "o"), "--scheduler-shift", "-1"]) == 2
    assert "--scheduler-shift -1.0 is out of range" in capsys.readouterr().err


def test_tiny_lora_command_writes_adapters_diffusers_loads(tmp_path, tiny_model, capsys):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(tiny_model), dtype=torch.float32)
    for layout in ("diffusers", "kohya", "comfyui", "diffsynth"):
        path = tmp_path / f"{layout}.safetensors"
        assert main(["tiny-lora", str(tiny_model), str(path), "--rank", "2", "--format", layout, "-q"]) == 0
        pipe.load_lora_weights(str(path), adapter_name=layout)
        wrapped = pipe.transformer.transformer_blocks[1].attn.to_q
        assert wrapped.lora_A[layout].weight.shape == (2, wrapped.in_features), layout
    assert "wrote a random rank-2 LoRA" in capsys.readouterr().out


def test_adapters_on_s3_are_fetched_once_into_the_local_cache(
    tmp_path, tiny_model, s3_endpoint, s3, bucket, monkeypatch
):
    import qwen_batch.adapters.loras
    from qwen_batch.adapters.loras import adapter_cache_folder
    from tests.s3_server import upload_manifest

    path = write_tiny_lora("tiny", tmp_path / "style.safetensors", seed=4)
    s3.put_object(Bucket=bucket, Key="job/loras/style.safetensors", Body=path.read_bytes())
    rows = [small_row(f"r{n}", "a fox", seed=n, loras=[lora("loras/style.safetensors")]) for n in range(3)]
    manifest = upload_manifest(s3, bucket, "job/m.parquet", rows, tmp_path)
    fetched = []
    original = qwen_batch.adapters.loras.read_url

    def counting(url, options=None):
        fetched.append(url)
        return original(url, options)

    monkeypatch.setattr(qwen_batch.adapters.loras, "read_url", counting)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    summary = run(RunConfig(manifest, f"s3://{bucket}/out", device="cpu", batch_size=2))
    assert summary.exit_code == 0 and summary.generated == 3
    assert fetched == [f"s3://{bucket}/job/loras/style.safetensors"]
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert (adapter_cache_folder() / f"{sha}.safetensors").read_bytes() == path.read_bytes()


def test_switching_adapters_never_recompiles_compiled_blocks(tmp_path, tiny_model):
    """The fused weights change in place and the module tree is the one compiled: no recompiles."""
    import torch._dynamo
    from diffusers import QwenImagePipeline

    from qwen_batch.adapters.fusion import AdapterFusion

    refs = []
    for seed in (1, 2):
        path = write_tiny_lora("tiny", tmp_path / f"l{seed}.safetensors", seed=seed)
        refs.append(LoraRef(str(path), 1.0, hashlib.sha256(path.read_bytes()).hexdigest()))
    pipe = QwenImagePipeline.from_pretrained(str(tiny_model), dtype=torch.float32, text_encoder=None, tokenizer=None)
    transformer = pipe.transformer
    inputs = {
        "hidden_states": torch.randn(1, 16, 64),
        "encoder_hidden_states": torch.randn(1, 8, transformer.config.joint_attention_dim),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [[(1, 4, 4)]],
        "return_dict": False,
    }
    fusion = AdapterFusion(pipe)
    torch._dynamo.reset()
    transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    with torch.no_grad():
        original = transformer(**inputs)[0]
        outputs = {}
        with torch._dynamo.config.patch(error_on_recompile=True):
            for adapters in [(refs[0],), (refs[1],), (), (refs[0], refs[1]), (refs[0],)]:
                fusion.use(adapters)
                outputs.setdefault(adapters, transformer(**inputs)[0])
    assert torch.equal(outputs[()], original)  # restored exactly
    assert not torch.allclose(outputs[(refs[0],)], original)
    assert fusion.stats.fuses == 4


def test_fp8_storage_fuses_into_the_original_weights_then_casts(tmp_path, tiny_model):
    """fp8 (here layerwise fp8 storage, the CPU's fp8) fuses into the kept originals, not into fp8 weights:
    a row without adapters after one with is the same as in a run without adapters, and an adapter row
    is close to its full-precision image."""
    write_tiny_lora("tiny", tmp_path / "a.safetensors", seed=1)
    rows = [small_row("with", "a fox", seed=1, loras=[lora("a.safetensors")]), small_row("without", "a fox", seed=1)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    fp8 = run(RunConfig(str(manifest), str(tmp_path / "fp8"), device="cpu", memory_mode="fp8"))
    assert fp8.exit_code == 0 and fp8.denoise.adapter_fuses == 1
    plain = write_manifest(tmp_path / "plain.parquet", rows[1:])
    run(RunConfig(str(plain), str(tmp_path / "fp8-plain"), device="cpu", memory_mode="fp8"))
    full = run(RunConfig(str(manifest), str(tmp_path / "fp32"), device="cpu"))
    assert full.exit_code == 0
    assert np.array_equal(
        pixels(tmp_path / "fp8/images/without.png"), pixels(tmp_path / "fp8-plain/images/without.png")
    )
    difference = np.abs(pixels(tmp_path / "fp8/images/with.png") - pixels(tmp_path / "fp32/images/with.png"))
    effect = np.abs(pixels(tmp_path / "fp32/images/with.png") - pixels(tmp_path / "fp32/images/without.png"))
    assert difference.mean() < effect.mean() / 3, (difference.mean(), effect.mean())


def test_a_pickled_adapter_is_never_unpickled(tmp_path, tiny_model):
    """A .safetensors name on a pickle must not run its code: the check reads safetensors only."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (shutil.copyfile, (__file__, str(marker)))

    import pickle

    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps(Payload()))
    manifest = write_manifest(tmp_path / "m.parquet", [small_row("a", "a fox", loras=[lora("evil.safetensors")])])
    summary = run(RunConfig(str(manifest), str(tmp_path / "out"), device="cpu"))
    assert summary.invalid == 1 and not marker.exists()
    assert json.dumps(summary.problems).count("not a safetensors file") == 1


@pytest.mark.parametrize(
    ("manifest", "invalid"), [("lora_example.parquet", {"not-a-safetensors"}), ("edit_lora_example.parquet", set())]
)
def test_the_example_manifests_adapters_fit_the_tiny_models(manifest, invalid, tiny_model, tmp_path):
    """prompts/loras/ holds adapters for the tiny models: rebuilt tiny models must still take them
    (python prompts/build.py writes them again)."""
    from pathlib import Path

    examples = Path(__file__).parents[1] / "prompts"
    plan = plan_run(RunConfig(str(examples / manifest), str(tmp_path / "out"), device="cpu"))
    assert {row.id for row in plan.manifest.invalid} == invalid, [row.reason for row in plan.manifest.invalid]
    assert all(request.loras or request.id.endswith("plain") for request in plan.todo)


def test_the_same_seed_writes_the_same_adapter_bytes(tmp_path, tiny_model):
    """Its SHA-256 is in every row's fingerprint: a rebuilt example adapter must not regenerate rows."""
    first = write_tiny_lora("tiny", tmp_path / "a.safetensors", layout="comfyui", seed=5).read_bytes()
    second = write_tiny_lora("tiny", tmp_path / "b.safetensors", layout="comfyui", seed=5).read_bytes()
    assert first == second
