"""The model-family seam: a model's family comes from its model_index.json, and what is specific to an
architecture (pipeline classes, components, a row's sizes and defaults, tiny models, planner costs) is the
family's."""

import json
from dataclasses import replace

import pyarrow as pa
import pytest

from qwen_batch.errors import ModelError
from qwen_batch.families import EDIT, EDIT_PLUS, GENERATE, family_of_pipeline, tiny_model
from qwen_batch.families.qwen_image import FAMILY as QWEN_IMAGE
from qwen_batch.families.qwen_image21 import FAMILY as QWEN_IMAGE21
from qwen_batch.manifest import validate_table
from qwen_batch.weights.model_source import ModelSource, model_family, pipeline_class_name


def test_the_family_comes_from_the_pipeline_class_of_model_index_json(tmp_path):
    for pipeline, task in (("QwenImagePipeline", GENERATE), ("QwenImageEditPlusPipeline", EDIT_PLUS)):
        (tmp_path / pipeline).mkdir()
        (tmp_path / pipeline / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
        source = ModelSource(name=pipeline, location=str(tmp_path / pipeline))
        assert model_family(source) is QWEN_IMAGE and QWEN_IMAGE.task_of(pipeline_class_name(source)) == task
    (tmp_path / "next").mkdir()
    (tmp_path / "next" / "model_index.json").write_text(json.dumps({"_class_name": "QwenImage21Pipeline"}))
    assert model_family(ModelSource(name="./next", location=str(tmp_path / "next"))) is QWEN_IMAGE21
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(
        ModelError, match=r"is a FluxPipeline; qwen-batch runs QwenImagePipeline, .*QwenImage21Pipeline"
    ):
        model_family(ModelSource(name="./other", location=str(tmp_path / "other")))


def test_tiny_models_are_registered_by_their_family():
    assert tiny_model("tiny") == (QWEN_IMAGE, GENERATE)
    assert tiny_model("tiny-edit") == (QWEN_IMAGE, EDIT) and tiny_model("Qwen/Qwen-Image") is None
    assert family_of_pipeline("QwenImageEditPipeline", "m") is QWEN_IMAGE
    assert tiny_model("tiny-2.1") == (QWEN_IMAGE21, GENERATE) and tiny_model("tiny-2.1-turbo")[0] is QWEN_IMAGE21


def test_a_rows_sizes_steps_and_guidance_are_the_familys():
    table = pa.table({"id": ["a", "b"], "prompt": ["a cat", "a dog"], "width": [1008, 1024], "height": [1024, 1024]})
    plain = validate_table(table)
    assert [row.id for row in plain.requests] == ["a", "b"], "multiples of 16: both valid for Qwen-Image"
    assert plain.requests[0].num_inference_steps == 50 and plain.requests[0].true_cfg_scale == 4.0
    # A family whose sizes are multiples of 32 and whose default is 40 steps, guidance 1 (as Qwen-Image-2.1).
    rules = replace(QWEN_IMAGE.rows, size_multiple=32, default_steps=40, default_true_cfg_scale=1.0)
    other = validate_table(table, family_rules=rules)
    assert [row.id for row in other.requests] == ["b"] and other.requests[0].num_inference_steps == 40
    assert other.requests[0].true_cfg_scale == 1.0
    assert "width 1008 is not a multiple of 32: use 992 or 1024" in other.invalid[0].reason


def test_the_planner_reads_the_model_sizes_from_the_family():
    from qwen_batch.memory.planner import COSTS, WeightsSummary

    assert COSTS is QWEN_IMAGE.cost_constants()
    assert WeightsSummary.published().nbytes == 2 * QWEN_IMAGE.cost_constants().DIT_PARAMS
