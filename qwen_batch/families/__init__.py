"""Model families: everything specific to one architecture, behind one object chosen from `model_index.json`.

A family (`ModelFamily`) says which diffusers pipeline classes it runs and the task of each, which
components each stage loads, the rules a manifest row must follow for it (size multiple and bounds,
default steps and guidance), its tiny random-weight models, the planner's cost constants, and how its
stages are built. The engine, the manifest, the planner and `weights.model_source` ask the family;
none of them names a pipeline class.

A model's family comes from the `_class_name` its `model_index.json` names (`family_of_pipeline`), or for
the tiny models from their name (`tiny_model`). Adding a family (Qwen-Image-2.1: a single-stream
transformer with block-causal attention, a Qwen3-VL encoder and a prefix KV cache) is a subpackage
here with its `FAMILY`, and one entry in `_families`; see docs/architecture.md.

This module and the families' `__init__` stay light (no torch, no diffusers): `qwen-batch validate` and
`--help` read them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from qwen_batch.errors import ModelError

if TYPE_CHECKING:
    from pathlib import Path

GENERATE, EDIT, EDIT_PLUS = "generate", "edit", "edit-plus"  # what a pipeline class does


@dataclass(frozen=True)
class RowRules:
    """What a manifest row of this family may ask for, and what it gets when it asks for nothing."""

    size_multiple: int  # width and height: the VAE's downscale times the transformer's patch size
    min_size: int
    max_size: int
    default_size: int
    default_steps: int
    min_steps: int
    max_steps: int
    default_true_cfg_scale: float
    # Condition images a text-to-image row may bring in `images` (or `image`), shared by no other row: the
    # encoder sees them with the prompt and their latents precede the noise (Qwen-Image-2.1). 0: none; edit
    # models take their input images through the edit task instead.
    max_condition_images: int = 0
    # The checkpoint samples a fixed grid of sigmas (2.1-Turbo's `sample_sigmas`): its length is the only step
    # count a row may ask for.
    fixed_steps: int | None = None
    # Guidance runs only against a negative prompt the row gives (2.1): above 1 without one is refused, where
    # diffusers would silently turn guidance off.
    guidance_needs_negative_prompt: bool = False


@dataclass(frozen=True)
class ModelFamily:
    name: str  # e.g. qwen-image, in messages and docs
    pipelines: Mapping[str, str]  # diffusers pipeline class -> the task it does (GENERATE, EDIT, EDIT_PLUS)
    encoder_components: tuple[str, ...]  # what stage 1 loads
    denoiser_components: tuple[str, ...]  # what stage 2 loads
    rows: RowRules
    example_models: Mapping[str, str]  # a published model for each task, named in messages
    tiny_models: Mapping[str, str]  # --model names of the tiny random-weight models -> their task
    # Writes a tiny random-weight model of a task into a folder: (folder, seed, task) -> folder. Imports torch.
    write_tiny_model: Callable[[Path, int, str], Any]
    tiny_model_revision: Callable[[str], str]  # changes when what write_tiny_model writes changes
    # The planner's constants for this architecture (sizes counted from the configs, costs measured).
    cost_constants: Callable[[], ModuleType]
    # Stage 1: (rows, EncodeContext, edit manifest?) -> EncodeStats; every text (and edit input) into the cache.
    encode: Callable[[list, Any, bool], Any]
    # Stage 2: the class that loads the transformer and VAE once and denoises batches (its `generate`).
    generator_class: Callable[[], type]
    # The embedding cache of a model: (folder, source, dtype, pipeline class, edit manifest?) -> EmbeddingCache,
    # its namespace hashing everything besides a row's inputs that determines what stage 1 caches.
    open_cache: Callable[[Any, Any, Any, str, bool], Any]
    # Stage 2's view of that cache: (cache, edit manifest?) -> an object whose `resolve(request)` gives the item
    # a batch is made of (its `batch_key`, its `request`; raises QwenBatchError for a row that cannot run),
    # `load(item)` the row's cached tensors, `conditions(rows, items)` what `generate` takes besides the text,
    # `finished(images, rows)` the images as written.
    cached_rows: Callable[[Any, bool], Any]
    # The rules of one checkpoint (model_index.json's config), where they differ from the family's.
    checkpoint_rules: Callable[[RowRules, Mapping[str, Any]], RowRules] = lambda rules, model_index: rules
    # Why a valid row cannot run on this family (a feature it lacks), or None: the row turns invalid with it.
    unsupported: Callable[[Any], str | None] = lambda request: None
    # What `checkpoint_rules` reads from the model_index.json of a tiny model (of a task or flavour, as in
    # `tiny_models`), known without building it: `qwen-batch validate --model tiny-2.1-turbo` builds nothing.
    tiny_model_index: Callable[[str], Mapping[str, Any]] = lambda task: {}
    # The images carry an alpha channel (2.1's RGBA VAE): only formats that keep it can hold them.
    rgba_output: bool = False

    def refused(self, requests) -> dict[str, str]:
        """The rows of `requests` this family cannot run (`unsupported`), by id, with the reason."""
        return {request.id: reason for request in requests if (reason := self.unsupported(request)) is not None}

    def task_of(self, pipeline_class: str) -> str:
        return self.pipelines[pipeline_class]

    @property
    def edit_pipelines(self) -> tuple[str, ...]:
        return tuple(name for name, task in self.pipelines.items() if task != GENERATE)

    def pipeline_for(self, task: str) -> str:
        return next(name for name, does in self.pipelines.items() if does == task)


def _families() -> tuple[ModelFamily, ...]:
    from qwen_batch.families.qwen_image import FAMILY as QWEN_IMAGE
    from qwen_batch.families.qwen_image21 import FAMILY as QWEN_IMAGE21

    return (QWEN_IMAGE, QWEN_IMAGE21)


def family_of_pipeline(pipeline_class: str | None, model: str) -> ModelFamily:
    """The family that runs `pipeline_class` (model_index.json's `_class_name`); a ModelError that lists
    what qwen-batch runs otherwise."""
    for family in _families():
        if pipeline_class in family.pipelines:
            return family
    known = [name for family in _families() for name in family.pipelines]
    raise ModelError(f"model {model!r} is a {pipeline_class}; qwen-batch runs {', '.join(known)} models")


def tiny_model(name: str) -> tuple[ModelFamily, str] | None:
    """The family and task of the tiny model `--model name` names, None when it names none."""
    for family in _families():
        if name in family.tiny_models:
            return family, family.tiny_models[name]
    return None


def default_family() -> ModelFamily:
    """The family a manifest is checked against before any model is named (`qwen-batch validate`)."""
    return _families()[0]
