"""Plans for several GPUs (`qwen-batch plan --gpus N`, the fan-out's `gpu_memory_gib`): the mode per GPU,
the fan-out's images per hour, and the comparison a dual-GPU setup asks for. Pure arithmetic."""

from __future__ import annotations

import json

import pytest

from qwen_batch.cli import main
from qwen_batch.families.qwen_image import FAMILY as QWEN_IMAGE
from qwen_batch.memory.fleet import PER_GPU_EFFICIENCY, plan_fleet, scaling
from qwen_batch.memory.planner import Machine, Workload, plan_memory


def options(fleet) -> dict:
    return {option.mode: option for option in fleet.options}


def test_two_24_gib_cards_on_one_host_run_fp8_each_and_say_why_not_offload():
    fleet = plan_fleet(Machine(gpu_gib=24, host_gib=64), Workload(), gpus=2)
    assert fleet.chosen.mode == "fp8" and fleet.chosen.plan.denoise.peak_gpu_gib <= 24
    assert fleet.chosen.host_gib_per_host <= 20  # both processes, their loads included: no staggering needed
    by_mode = options(fleet)
    assert by_mode["bf16"].plan is None and "GPU memory" in by_mode["bf16"].refused
    # Offload streams 38 GiB a step per process; with 32 GiB of the host each, part of it comes from disk.
    assert by_mode["offload"].plan.denoise.streamed_from_disk_gib > 0
    assert fleet.chosen.images_per_hour[0] > 5 * by_mode["offload"].images_per_hour[0]
    one = plan_memory(Machine(gpu_gib=24, host_gib=32), Workload()).denoise.seconds_per_image
    assert fleet.chosen.images_per_hour == pytest.approx((3600 / one[1] * 1.904, 3600 / one[0] * 1.904), rel=1e-3)
    assert "need no staggering" in " ".join(fleet.reasons)


def test_with_room_for_two_pinned_copies_offload_fits_and_fp8_is_still_faster():
    fleet = plan_fleet(Machine(gpu_gib=24, host_gib=192), Workload(), gpus=2)
    fp8, offload = options(fleet)["fp8"], options(fleet)["offload"]
    assert offload.plan is not None and offload.lossless and not fp8.lossless
    assert offload.host_gib_per_host == pytest.approx(2 * offload.plan.denoise.host_gib)
    assert fp8.images_per_hour[0] > offload.images_per_hour[0]
    assert fleet.chosen is fp8
    text = " ".join(fleet.reasons)
    assert "fp8 on each GPU is the fastest that fits" in text
    assert "for bf16-exact images, bf16 with the weights streamed from host RAM (offload)" in text
    assert "pins its own copy" in text


def test_big_cards_keep_bf16_and_name_the_faster_lossy_option():
    fleet = plan_fleet(Machine(gpu_gib=80, host_gib=256), Workload(), gpus=8, gpus_per_host=1)
    assert fleet.chosen.mode == "bf16" and fleet.scaling == pytest.approx(8 * PER_GPU_EFFICIENCY)
    assert "would be faster" in fleet.reasons[0] and "--memory-mode fp8" in fleet.reasons[0]
    forced = plan_fleet(Machine(gpu_gib=80, host_gib=256), Workload(), gpus=8, mode="fp8", gpus_per_host=1)
    assert forced.chosen.mode == "fp8"


def test_one_gpu_is_the_one_gpu_plan():
    assert scaling(1) == 1.0 and scaling(2) == pytest.approx(1.904)
    fleet = plan_fleet(Machine(gpu_gib=80, host_gib=128), Workload(), gpus=1)
    low, high = plan_memory(Machine(gpu_gib=80, host_gib=128), Workload()).denoise.seconds_per_image
    assert fleet.chosen.images_per_hour == pytest.approx((3600 / high, 3600 / low), rel=1e-3)


def test_plan_gpus_on_the_command_line(capsys):
    assert main(["plan", "--gpu-memory", "24", "--host-memory", "192", "--gpus", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["per_gpu"]["denoise"]["mode"] == "fp8" and printed["fleet"]["gpus"] == 2
    assert {option["mode"] for option in printed["fleet"]["options"]} == {"bf16", "fp8", "offload", "fp8-offload"}
    assert main(["plan", "--gpu-memory", "24", "--host-memory", "192", "--gpus", "2"]) == 0
    report = capsys.readouterr().out
    assert "fleet: 2 x 24 GiB GPU" in report and "why: " in report
    assert main(["plan", "--gpu-memory", "24", "--host-memory", "64", "--gpus", "0"]) == 2
    assert "--gpus 0: use 1 or more" in capsys.readouterr().err


def test_the_fanout_gives_every_shard_the_planned_mode_and_batch(tmp_path):
    from prefect.logging import disable_run_logger

    from flows.parameters import BatchParameters, FanoutParameters
    from flows.qwen_image_fanout import plan_fleet_for
    from qwen_batch.manifest import read_manifest
    from tests.support import write_manifest

    manifest = read_manifest(str(write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a fox"}])))
    unplanned = FanoutParameters(manifest=str(tmp_path / "m.parquet"), shards=2)
    with disable_run_logger():
        assert plan_fleet_for(unplanned, manifest, QWEN_IMAGE) == (unplanned, {})
        planned, prediction = plan_fleet_for(unplanned.model_copy(update={"gpu_memory_gib": 24}), manifest, QWEN_IMAGE)
    shard = BatchParameters(**planned.shard_parameters(1))
    assert (shard.memory_mode, shard.batch_size) == ("fp8", 1) == (prediction["mode"], prediction["batch_size"])
    assert prediction["images_per_hour"]


def test_with_a_transformer_file_the_fanout_leaves_the_mode_to_each_shard(tmp_path):
    """The fleet plan is made for the model's own weights; a GGUF or fp8 file has modes of its own."""
    from prefect.logging import disable_run_logger

    from flows.parameters import FanoutParameters
    from flows.qwen_image_fanout import plan_fleet_for
    from qwen_batch.manifest import read_manifest
    from tests.support import write_manifest

    manifest = read_manifest(str(write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a fox"}])))
    params = FanoutParameters(manifest=str(tmp_path / "m.parquet"), shards=2, gpu_memory_gib=16, transformer="q4.gguf")
    with disable_run_logger():
        planned, prediction = plan_fleet_for(params, manifest, QWEN_IMAGE)
    assert planned.memory_mode == "auto" and prediction == {}
