"""The memory planner for Qwen-Image-2.1: the run's family decides the sizes and costs planned for.

Pure arithmetic (no GPU, no torch), as tests/test_planner.py. 2.1's transformer (7.1 B parameters, 14.2 GB in
bf16) fits a 24 GiB card resident where Qwen-Image's (40.9 GB) does not; its 17.5 GB encoder runs in the stage
before, never beside it; each row's prefix keys and values are held through the later steps.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen_batch.cli import main
from qwen_batch.families import default_family, tiny_model
from qwen_batch.families.qwen_image21 import FAMILY as QWEN_IMAGE21
from qwen_batch.manifest import Request
from qwen_batch.memory.modes import BF16, FP8, STREAMING_MODES
from qwen_batch.memory.planner import (
    Machine,
    WeightsSummary,
    Workload,
    denoise_peak_gib,
    dit_weight_bytes,
    encoder_weight_bytes,
    plan_memory,
)

COSTS21 = QWEN_IMAGE21.cost_constants()
GiB = 2**30


def job21(**fields) -> Workload:
    """A 2.1 batch as its rows come by default: 1024x1024, 40 steps, no guidance (true_cfg_scale 1)."""
    return Workload(**{"family": QWEN_IMAGE21.name, "steps": 40, "true_cfg": False, **fields})


def test_the_counted_sizes_are_the_ones_planned_for():
    """Counted on the meta device from the published configs (qwen_batch/families/qwen_image21/costs.py)."""
    assert COSTS21.DIT_PARAMS == 7_115_124_736 and COSTS21.DIT_BLOCKS * COSTS21.DIT_BLOCK_PARAMS == 6_979_330_048
    assert COSTS21.ENCODER_PARAMS == 8_767_123_696 and COSTS21.VAE_PARAMS == 337_740_404
    job = job21()
    assert job.costs is COSTS21 and job.weights == WeightsSummary.published(COSTS21)
    assert job.weights.nbytes == 2 * 7_115_124_736 and "Qwen-Image-2.1" in job.weights.label
    assert dit_weight_bytes("bf16", costs=COSTS21) == 2 * 7_115_124_736
    # fp8: every block linear in fp8 (nothing inside the blocks kept), what is outside the blocks in bf16.
    fp8 = 6_979_330_048 + 2 * (7_115_124_736 - 6_979_330_048) + COSTS21.DIT_FP8_SCALE_BYTES
    assert dit_weight_bytes("fp8", costs=COSTS21) == fp8
    assert encoder_weight_bytes("bf16", COSTS21) == 2 * (8_767_123_696 - 622_329_856)  # the lm_head dropped
    # Qwen-Image's own figures stay the default.
    assert Workload().costs is default_family().cost_constants() and Workload().weights.nbytes == 2 * 20_430_401_088


def test_a_24_gib_card_runs_21_resident_in_bf16_and_qwen_image_not():
    machine = Machine(gpu_gib=24, host_gib=64)
    plan = plan_memory(machine, job21())
    assert (plan.encode.mode, plan.denoise.mode) == ("bf16", "bf16")
    assert plan.encode.peak_gpu_gib <= 24 - 0.6 and plan.denoise.peak_gpu_gib <= 24 - 0.6
    # The stages never overlap: the encoder (16.3 GB) and the transformer (14.2 GB) together would not fit.
    together = (encoder_weight_bytes("bf16", COSTS21) + dit_weight_bytes("bf16", costs=COSTS21)) / GiB
    assert together > 24
    assert plan_memory(machine, Workload()).denoise.mode != "bf16"  # Qwen-Image on the same card: fp8
    assert plan_memory(machine, job21(true_cfg=True)).denoise.mode == "bf16"  # with a negative prompt too


def test_a_16_gib_card_runs_21_in_fp8_and_smaller_cards_stream_it():
    sixteen = plan_memory(Machine(gpu_gib=16, host_gib=64), job21())
    assert sixteen.denoise.mode == "fp8" and sixteen.encode.mode == "fp8"
    assert "outside the blocks" in sixteen.denoise.how  # no block linear kept in bf16, unlike Qwen-Image's
    for gpu in (10, 8):
        small = plan_memory(Machine(gpu_gib=gpu, host_gib=64), job21())
        assert small.denoise.mode in STREAMING_MODES and small.denoise.peak_gpu_gib <= gpu - 0.6


def test_each_rows_prefix_cache_is_planned_per_row_and_pass():
    """After the first step a forward row keeps its prefix's keys and values at every block (512 KiB a token), held
    twice by the generator; a condition image adds 4,096 tokens to the prefix. Qwen-Image caches nothing."""
    assert COSTS21.PREFIX_KV_BYTES_PER_TOKEN == 32 * 2 * 4096 * 2
    plain = denoise_peak_gib("bf16", 1, job21(), False)
    conditioned = denoise_peak_gib("bf16", 1, job21(condition_images=1), False)
    per_image = 4096 * COSTS21.PREFIX_KV_BYTES_PER_TOKEN * COSTS21.PREFIX_KV_COPIES
    assert conditioned - plain == pytest.approx(per_image * 1.01 / GiB, abs=0.01)  # the VAE decode's peak dominates
    guided = denoise_peak_gib("bf16", 1, job21(condition_images=1, true_cfg=True), False)
    assert guided - conditioned >= (4096 + 256) * COSTS21.PREFIX_KV_BYTES_PER_TOKEN * 2 / GiB  # the negative's own
    qwen_image = Workload(batch_size=1)
    assert qwen_image.prefix_tokens == qwen_image.text_tokens and qwen_image.costs.PREFIX_KV_BYTES_PER_TOKEN == 0


def test_a_21_manifests_images_are_condition_images_not_edits():
    rows = [
        Request(0, "a", "a cat beside this dog", " ", 1024, 1024, 0, 40, 1.0, images=("dog.png",)),
        Request(1, "b", "a cat", " ", 1024, 1024, 1, 40, 1.0),
    ]
    job = Workload.for_requests(rows, "edit", family=QWEN_IMAGE21)
    assert (job.task, job.condition_images, job.family) == ("generate", 1, QWEN_IMAGE21.name)
    assert job.tokens == 4096 + 256 + 4096 and job.weights.nbytes == 2 * COSTS21.DIT_PARAMS
    qwen_image = Workload.for_requests(rows, "edit")
    assert (qwen_image.task, qwen_image.condition_images, qwen_image.input_images) == ("edit", 0, 1)


def test_21_timings_are_measured_where_measured_and_scaled_by_flops_elsewhere():
    """Compiled bf16 and fp8: the engine's seconds per image over 50 steps in bench/results/qwen_image21_h100.jsonl
    (the planner's figures are per row-forward). The rest: Qwen-Image's H100 seconds times the FLOPs ratio at the
    reference length (0.968), whose eager band holds vLLM-Omni's anchor (diffusers on an H200, one 1024x1024
    image, 50 steps, no guidance): 7.74 s."""
    from pathlib import Path

    lines = [json.loads(line) for line in Path("bench/results/qwen_image21_h100.jsonl").read_text().splitlines()]
    measured = {line["mode"]: line["engine_s_per_image"] for line in lines if line.get("engine_s_per_image")}
    assert COSTS21.FORWARD_SECONDS[(BF16, True)] == pytest.approx(measured["bf16"] / 50, abs=0.001)
    assert COSTS21.FORWARD_SECONDS[(FP8, True)] == pytest.approx(measured["fp8"] / 50, abs=0.001)
    ratio = COSTS21.FORWARD_FLOPS_RATIO
    assert ratio == pytest.approx(0.968, abs=0.001)
    qwen_image = default_family().cost_constants()
    for key, seconds in qwen_image.FORWARD_SECONDS.items():
        if key not in ((BF16, True), (FP8, True)):
            assert COSTS21.FORWARD_SECONDS[key] == pytest.approx(seconds * 0.968, abs=0.001)
    low, high = plan_memory(Machine(80, 128), job21(steps=50, batch_size=1, compile=False)).denoise.seconds_per_image
    assert low <= 7.74 <= high


def test_plan_command_plans_for_the_models_family(capsys):
    assert main(["plan", "--model", "tiny-2.1", "--gpu-memory", "24", "--host-memory", "64", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "Qwen-Image-2.1, bf16, 14.2 GB" in printed and "40 steps, true CFG off" in printed
    assert "encode: bf16" in printed and "denoise: bf16" in printed
    assert main(["plan", "--gpu-memory", "24", "--host-memory", "64", "-q"]) == 0  # no --model: Qwen-Image
    printed = capsys.readouterr().out
    assert "Qwen-Image, bf16, 40.9 GB" in printed and "denoise: fp8" in printed and "50 steps, true CFG on" in printed
    assert main(["plan", "--model", "tiny-2.1", "--gpu-memory", "16", "--host-memory", "64", "--json", "-q"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["job"]["family"] == "qwen-image-2.1" and plan["job"]["weights"]["nbytes"] == 2 * COSTS21.DIT_PARAMS
    assert plan["denoise"]["mode"] == "fp8"
    assert main(["plan", "--model", "tiny-2.1", "--task", "edit", "--gpu-memory", "24", "-q"]) == 2
    assert "qwen-image-2.1 models do not edit" in capsys.readouterr().err
    assert main(["plan", "--condition-images", "1", "--gpu-memory", "24", "-q"]) == 2
    assert "qwen-image rows take no condition images" in capsys.readouterr().err


def test_plan_reads_a_model_folders_family_from_its_model_index_alone(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline"}))
    assert main(["plan", "--model", str(tmp_path), "--gpu-memory", "24", "--host-memory", "64", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["job"]["family"] == "qwen-image-2.1"


def test_plan_for_a_tiny_model_builds_nothing_and_imports_no_torch(tmp_path):
    code = (
        "import sys; from qwen_batch.cli import main; "
        "main(['plan', '--model', 'tiny-2.1', '--gpu-memory', '24', '--host-memory', '64', '-q']); "
        "print('torch' in sys.modules)"
    )
    env = {"QWEN_BATCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip().endswith("False") and not any(tmp_path.iterdir())
    assert tiny_model("tiny-2.1")[0] is QWEN_IMAGE21


def test_a_runs_memory_is_decided_for_its_family(monkeypatch):
    """`decide_run_memory(..., family=...)` (what `plan_run` passes): the 2.1 rows plan 2.1's sizes."""
    from qwen_batch.memory.placement import decide_run_memory

    monkeypatch.setenv("QWEN_BATCH_GPU_MEMORY_GIB", "24")
    monkeypatch.setenv("QWEN_BATCH_HOST_MEMORY_GIB", "64")
    rows = [Request(0, "a", "a cat", " ", 1024, 1024, 0, 40, 1.0)]
    memory = decide_run_memory("auto", "off", None, None, 16, "cuda", rows, family=QWEN_IMAGE21)
    assert memory.plan.job.family == QWEN_IMAGE21.name and memory.denoiser.mode == "bf16"
    assert memory.plan.job.weights.nbytes == 2 * COSTS21.DIT_PARAMS
    default = decide_run_memory("auto", "off", None, None, 16, "cuda", rows)
    assert default.plan.job.family == default_family().name and default.denoiser.mode == "fp8"
