"""The staged run: validate -> plan (resume) -> encode every text -> denoise in batches -> merge results.

Each stage is a function a caller can run on its own (the CLI runs them in order; a Prefect flow
wraps them in tasks over chunks of rows), and the GPU never holds the text encoder and the
transformer together: stage 1 frees the encoder before stage 2 loads the transformer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from qwen_batch.adapters.loras import LoraRef, resolve_adapters, transformer_layout
from qwen_batch.errors import ConfigError, QwenBatchError
from qwen_batch.families import EDIT_PLUS, GENERATE, ModelFamily, tiny_model
from qwen_batch.io.input_images import input_versions
from qwen_batch.io.storage import Folder, StorageOptions
from qwen_batch.manifest import EDIT, IMAGES_COLUMN, InvalidRow, Manifest, Request, read_manifest, validate_table
from qwen_batch.memory.device import gpu_memory_gib, reset_peak_memory, resolve_device, resolve_dtype
from qwen_batch.memory.oom import is_out_of_memory, retry_in_halves
from qwen_batch.memory.placement import Placement, RunMemory, decide_run_memory
from qwen_batch.memory.planner import WeightsSummary, check_mode_for_weights
from qwen_batch.outputs.content_credentials import ContentCredentials
from qwen_batch.outputs.destinations import ImageFiles, ShardedImages, reconcile_shards
from qwen_batch.outputs.encoder import ImageEncoder
from qwen_batch.outputs.images import ImageFormat, refuse_alpha
from qwen_batch.outputs.shards import FILES
from qwen_batch.pipeline.conditions.cached_images import prepare_image_inputs
from qwen_batch.pipeline.conditions.controlnet import ControlNetSource
from qwen_batch.pipeline.embedding_cache import EmbeddingCache
from qwen_batch.pipeline.encode import EncodeContext, EncodeStats
from qwen_batch.progress import Progress, Silent
from qwen_batch.run.config import RunConfig
from qwen_batch.run.results import FAILED, INVALID, OK, PARTS_FOLDER, RESULTS_FILE, Record, ResultStore, fingerprint
from qwen_batch.run.sharding import assign_shards
from qwen_batch.run.summary import DenoiseStats, Summary, write_shard_stats
from qwen_batch.run.writer import BatchWriter
from qwen_batch.weights.model_source import (
    ModelSource,
    model_family,
    model_index,
    pipeline_class_name,
    resolve_model,
)
from qwen_batch.weights.transformer_file import TransformerFile, file_weights, is_gguf, open_transformer_file

if TYPE_CHECKING:
    import torch

    from qwen_batch.pipeline.denoise import ImageGenerator

log = logging.getLogger(__name__)
T = TypeVar("T")

CACHE_FOLDER = "cache"
TRUNCATION_WARNING = "prompt longer than the encoder's 1024-token limit: truncated"


@dataclass
class RunPlan:
    """What a run will do, decided before any model loads."""

    config: RunConfig
    manifest: Manifest
    output: Folder
    store: ResultStore
    cache: EmbeddingCache
    source: ModelSource
    device: str
    dtype: torch.dtype
    fingerprints: dict[str, str]  # id -> fingerprint, for every valid row
    todo: list[Request]  # rows to generate
    skipped: list[Request]  # rows whose image and result already exist with the same parameters
    family: ModelFamily  # what the model's architecture decides (qwen_batch.families)
    pipeline_class: str  # the model's diffusers pipeline class, one of the family's
    memory: RunMemory  # each stage's memory mode and batch size, decided for this GPU
    transformer_file: TransformerFile | None = None  # --transformer, checked and hashed
    controlnet: ControlNetSource | None = None  # --controlnet, checked against the transformer
    encoder: ImageEncoder = field(default_factory=ImageEncoder)  # the image format, marks and C2PA signer

    @property
    def output_format(self) -> str:
        return self.config.output_format

    def destination(self) -> ImageFiles | ShardedImages:
        """Where this run's images go (a new shard writer per denoise stage: it publishes its last shard)."""
        if self.output_format == FILES:
            return ImageFiles(self.output, self.encoder.format)
        return ShardedImages(
            self.output,
            self.output_format,
            self.encoder.format,
            self.config.shard_size,
            worker=self.config.shard_index,
            workers=self.config.shard_count,
        )

    @property
    def is_edit(self) -> bool:
        return self.manifest.task == EDIT

    @property
    def batch_size(self) -> int:
        return self.memory.batch_size

    @property
    def encode_batch_size(self) -> int:
        return self.memory.encode_batch_size


def plan_run(config: RunConfig) -> RunPlan:
    """Validate the manifest, check the output can be written, and decide which rows to generate.

    Loads no model. A manifest-level error is raised before anything is written; a missing bucket
    or denied access to the output or cache is raised before any model loads.
    """
    manifest, family, source, pipeline_class = read_run_manifest(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    transformer_file, transformer_summary = _transformer_file(config, source)
    manifest = _with_adapters(manifest, source, config.storage_options, transformer_file)
    controlnet, manifest = _with_controlnet(config, source, manifest)
    encoder = _image_encoder(config, family, source)
    output = Folder(config.output, config.storage_options)
    cache_folder = Folder(config.cache, config.storage_options) if config.cache else output.child(CACHE_FOLDER)
    store = ResultStore(output)
    output.check_writable()
    if config.cache:
        cache_folder.check_writable()

    components = (
        family.encoder_components + family.denoiser_components + (("processor",) if manifest.task == EDIT else ())
    )
    if transformer_file is None:
        model_identity = source.identity(components)
    else:  # the model's own transformer weights play no part; the file's content does
        kept = tuple(component for component in components if component != "transformer")
        model_identity = f"{source.identity(kept)}+{transformer_file.identity}"
    # A row with control images is also the ControlNet's: other weights, another image.
    control_identity = f"{model_identity}+controlnet:{controlnet.identity()}" if controlnet else model_identity
    versions = input_versions(
        [url for request in manifest.requests for url in request.input_urls], config.storage_options
    )
    fingerprints = {
        request.id: fingerprint(request, control_identity if request.controls else model_identity, versions)
        for request in manifest.requests
    }
    previous, _ = store.previous_records()
    shards = assign_shards(manifest.requests, config.shard_count, config.batch_size, family) if config.is_shard else {}
    mine = [request for request in manifest.requests if shards.get(request.id, 0) == config.shard_index]
    if config.output_format == FILES:
        done = _done_ids(mine, fingerprints, ImageFiles(output, encoder.format), previous)
    else:  # the shards themselves say what is done; rows published but unrecorded are adopted
        done, adopted = reconcile_shards(output, config.output_format, mine, fingerprints, previous)
        if adopted:
            store.write_part(adopted)
    todo = [request for request in mine if request.id not in done]
    skipped = [request for request in mine if request.id in done]
    memory = decide_run_memory(
        config.memory_mode,
        config.compile,
        config.compile_cache,
        config.batch_size,
        config.encode_batch_size,
        device,
        todo,
        task=manifest.task,
        fp8_every_linear=config.fp8_every_linear,
        transformer=transformer_summary,
        controlnet_layers=controlnet.config().get("num_layers", 0) if controlnet else 0,
        family=family,
    )
    return RunPlan(
        config=config,
        manifest=manifest,
        output=output,
        store=store,
        cache=family.open_cache(cache_folder, source, dtype, pipeline_class, manifest.task == EDIT),
        source=source,
        device=device,
        dtype=dtype,
        fingerprints=fingerprints,
        todo=todo,
        skipped=skipped,
        family=family,
        pipeline_class=pipeline_class,
        memory=memory,
        transformer_file=transformer_file,
        controlnet=controlnet,
        encoder=encoder,
    )


def _image_encoder(config: RunConfig, family: ModelFamily, source: ModelSource) -> ImageEncoder:
    """The image format checked against the model's images (RGBA: no jpeg), and the C2PA credentials read and
    tried, before anything is written or loaded (a usage error, exit 2)."""
    image_format = ImageFormat(config.image_format)
    refuse_alpha(image_format, family.rgba_output, source.name)
    credentials = config.content_credentials
    if credentials is None and config.c2pa_cert:
        credentials = ContentCredentials.from_files(config.c2pa_cert, config.c2pa_key)
    return ImageEncoder(image_format, config.image_quality, credentials, config.storage_options)


def read_run_manifest(config: RunConfig) -> tuple[Manifest, ModelFamily, ModelSource, str]:
    """The manifest as a run of `config` reads it, with the model's family, the model and its pipeline class:
    the rows checked against the family's rules and the checkpoint's own (2.1-Turbo's steps), the model checked
    against the manifest (a ConfigError), and the rows the family cannot run turned invalid with the reason.
    Reads no weights (a tiny model is built; a hub model not downloaded yet: its model_index.json only).

    The fan-out reads the manifest through this too, so its split and its merge see the rows its shards see:
    a 2.1 manifest's `images` column holds condition images, optional per row, not edit inputs."""
    family = _family_of(config.model)
    manifest = read_manifest(
        config.manifest,
        config.storage_options,
        config.manifest_task,
        config.allow_inputs,
        config.row_defaults,
        family.rows,
    )
    source = resolve_model(_model_for(config.model, manifest, family))
    pipeline_class = pipeline_class_name(source)
    rules = family.checkpoint_rules(family.rows, model_index(source))
    if rules != family.rows:  # this checkpoint's own defaults (2.1-Turbo's fixed steps): the rows checked again
        manifest = validate_table(
            manifest.table, manifest.url, manifest.task, config.allow_inputs, config.row_defaults, rules
        )
    _check_model_fits(manifest, source, family, pipeline_class)
    manifest = manifest.invalidated(family.refused(manifest.requests))
    return manifest, family, source, pipeline_class


def _transformer_file(config: RunConfig, source: ModelSource) -> tuple[TransformerFile | None, WeightsSummary | None]:
    """--transformer: found, read and checked against the model's transformer config, and the memory mode
    asked for checked against its weights, before anything is written or loaded (a wrong file or mode is a
    usage error, exit 2). Returns the file and what the planner needs of it (kind and sizes as stored)."""
    if not config.transformer:
        return None, None
    file = open_transformer_file(config.transformer, config.storage_options)
    summary = WeightsSummary.of(file_weights(file, source.transformer_config()))  # the architecture check
    check_mode_for_weights(config.memory_mode, summary)
    log.info("transformer: %s (%s, %.1f GB, sha256 %s)", file.location, file.storage, file.size / 1e9, file.sha256)
    return file, summary


def _family_of(model: str) -> ModelFamily:
    """The family of `--model`: a tiny model's from its name (it is built later, for the manifest's task),
    any other's from the pipeline class its model_index.json names."""
    registered = tiny_model(model)
    return registered[0] if registered is not None else model_family(resolve_model(model))


def _model_for(model: str, manifest: Manifest, family: ModelFamily) -> str:
    """A tiny model's name means the family's tiny model of the manifest's task."""
    if tiny_model(model) is None or manifest.task != EDIT or family.rows.max_condition_images:
        return model
    task = EDIT_PLUS if IMAGES_COLUMN in manifest.table.column_names else EDIT
    return next(name for name, does in family.tiny_models.items() if does == task)


def _check_model_fits(manifest: Manifest, source: ModelSource, family: ModelFamily, pipeline_class: str) -> None:
    """A text-to-image model cannot edit and vice versa: say so before anything loads."""
    task, examples = family.task_of(pipeline_class), family.example_models
    if family.rows.max_condition_images:  # its text-to-image rows may bring condition images: any manifest runs
        return
    if manifest.task == EDIT and task == GENERATE:
        raise ConfigError(
            f"{manifest.url} is an edit manifest but model {source.name!r} is a text-to-image {pipeline_class}; "
            f"use an edit model (--model {examples[EDIT]}, {examples[EDIT_PLUS]} or tiny)"
        )
    if manifest.task != EDIT and task != GENERATE:
        raise ConfigError(
            f"model {source.name!r} is an edit model ({pipeline_class}) but {manifest.url} has no input images; "
            f"use a text-to-image model (--model {examples[GENERATE]}) or add an 'image' column"
        )
    several = [request.id for request in manifest.requests if len(request.images) > 1]
    if several and task != EDIT_PLUS:
        raise ConfigError(
            f"rows {several[:5]} have several input images, which only Edit-Plus models take; "
            f"use --model {examples[EDIT_PLUS]} (or tiny)"
        )


TINY_CONTROLNETS = {"tiny": "union", "tiny-inpaint": "inpaint"}  # --controlnet NAME -> tiny_controlnet kind


def _with_controlnet(
    config: RunConfig, source: ModelSource, manifest: Manifest
) -> tuple[ControlNetSource | None, Manifest]:
    """--controlnet checked against the transformer (a usage error, before anything loads); without it, rows
    with control images are invalid with the reason and the others run."""
    if config.controlnet is not None:
        location = config.controlnet
        if location in TINY_CONTROLNETS:  # the tiny model's random-weight ControlNets, as --model tiny
            from qwen_batch.tiny.controlnet import ensure_tiny_controlnet

            location = str(ensure_tiny_controlnet(TINY_CONTROLNETS[location]))
        controlnet = ControlNetSource(location)
        controlnet.check_fits(source.transformer_config())
        reasons = {r.id: controlnet.check_row(r) for r in manifest.requests if r.controls}
        return controlnet, manifest.invalidated({row_id: reason for row_id, reason in reasons.items() if reason})
    reason = "control_image needs a ControlNet: run with --controlnet MODEL (flow parameter controlnet)"
    return None, manifest.invalidated({request.id: reason for request in manifest.requests if request.controls})


def _with_adapters(
    manifest: Manifest, source: ModelSource, storage_options: StorageOptions, transformer_file: TransformerFile | None
) -> Manifest:
    """Read and check every adapter the rows name (`qwen_batch.adapters.loras.resolve_adapters`): a row whose
    adapter cannot be used becomes invalid with the reason; the others carry their files' SHA-256."""
    urls = [ref.url for request in manifest.requests for ref in request.loras]
    if not urls:
        return manifest
    gguf = is_gguf(transformer_file)
    resolved = resolve_adapters([] if gguf else urls, storage_options, transformer_layout(source))
    requests, invalid = [], list(manifest.invalid)
    for request in manifest.requests:
        if gguf and request.loras:
            reason = (
                f"loras: adapters cannot be fused into the GGUF-quantized transformer {transformer_file.name}; "
                "run these rows with the model's own (bf16) transformer or an fp8 file"
            )
            invalid.append(InvalidRow(request.index, request.id, reason, request.parameters()))
            continue
        problems = [
            f"loras[{position}] {resolved.problems[ref.url]}"
            for position, ref in enumerate(request.loras)
            if ref.url in resolved.problems
        ]
        if problems:
            invalid.append(InvalidRow(request.index, request.id, "; ".join(problems), request.parameters()))
            continue
        loras = tuple(replace(ref, sha256=resolved.sha256[ref.url]) for ref in request.loras)
        requests.append(replace(request, loras=loras))
    return replace(manifest, requests=requests, invalid=sorted(invalid, key=lambda row: row.index))


def _done_ids(
    requests: list[Request], fingerprints: dict[str, str], files: ImageFiles, records: dict[str, Record]
) -> set[str]:
    """Rows with an ok record of the same fingerprint whose image file is still there: nothing to redo."""
    candidates = {
        request.id
        for request in requests
        if (record := records.get(request.id)) is not None
        and record.status == OK
        and record.fingerprint == fingerprints[request.id]
    }
    return files.done_ids(candidates)


def pending(plan: RunPlan, requests: list[Request]) -> list[Request]:
    """Those of `requests` not done yet, judged from the output folder now: a retried chunk whose
    first attempt wrote some rows before failing regenerates only the rest."""
    records, _ = plan.store.previous_records()
    if plan.output_format == FILES:
        done = _done_ids(requests, plan.fingerprints, ImageFiles(plan.output, plan.encoder.format), records)
    else:
        done, adopted = reconcile_shards(plan.output, plan.output_format, requests, plan.fingerprints, records)
        if adopted:
            plan.store.write_part(adopted)
    return [request for request in requests if request.id not in done]


def encode_stage(plan: RunPlan, requests: list[Request] | None = None, progress: Progress | None = None) -> EncodeStats:
    """Stage 1: every text the rows need is in the embedding cache afterwards."""
    release_generator()  # never hold the transformer while the encoder loads
    requests = plan.todo if requests is None else requests
    context = EncodeContext(
        cache=plan.cache,
        source=plan.source,
        device=plan.device,
        dtype=plan.dtype,
        batch_size=plan.encode_batch_size,
        memory_mode=plan.memory.encoder_mode,
        pinned_bytes=plan.memory.encoder_pinned_bytes,
        storage_options=plan.config.storage_options,
        max_input_pixels=plan.config.max_input_pixels,
        progress=progress or Silent(),
    )
    stats = plan.family.encode(requests, context, plan.is_edit)
    # After the text encoder is gone: the VAE alone encodes init images, masks and control images.
    stats.encoded += prepare_image_inputs(requests, context)
    return stats


def make_batches(items: Sequence[T], batch_size: int) -> list[list[T]]:
    """Rows (or edit rows) that share a batch key, in chunks of `batch_size`, in manifest order, except that
    the batches of one adapter set run one after another: each set is fused once per run, not per batch."""
    groups: dict[Any, list[T]] = {}
    for item in items:
        groups.setdefault(item.batch_key, []).append(item)
    first_seen: dict[tuple[LoraRef, ...], int] = {}
    for key in groups:
        first_seen.setdefault(_loras_of(groups[key][0]), len(first_seen))
    ordered = sorted(groups.values(), key=lambda group: first_seen[_loras_of(group[0])])  # stable
    return [group[i : i + batch_size] for group in ordered for i in range(0, len(group), batch_size)]


def _loras_of(item: Any) -> tuple[LoraRef, ...]:
    return _request_of(item).loras


def _request_of(item: Any) -> Request:
    """The request of a batch item: a request, or a row resolved for stage 2 (an edit row...) that holds one."""
    return item if isinstance(item, Request) else item.request


def denoise_stage(
    plan: RunPlan, requests: list[Request] | None = None, progress: Progress | None = None
) -> DenoiseStats:
    """Stage 2: generate and write the images of `requests` (default: every row to do)."""
    progress = progress or Silent()
    requests = plan.todo if requests is None else requests
    stats = DenoiseStats()
    if not requests:
        return stats
    started = time.perf_counter()
    reset_peak_memory(plan.device)
    generator = generator_for(plan)
    writer = BatchWriter(plan.store, plan.destination(), plan.encoder)
    fusion_before = (generator.fusion.stats.fuses, generator.fusion.stats.seconds)
    cached_before = (generator.cached_steps, generator.cached_steps_computed)
    progress.start("denoise", len(requests), "images")
    try:
        rows = plan.family.cached_rows(plan.cache, plan.is_edit)
        for batch in _batches(plan, rows, writer, requests):
            _generate_batch(plan, generator, writer, batch, rows)
            progress.advance(len(batch))
        stats.records = writer.drain()
        stats.image_bytes = writer.image_bytes
        counts = writer.destination.counts
        stats.shards, stats.shard_rows, stats.shard_bytes = counts.shards, counts.rows, counts.bytes
    finally:
        progress.finish()
        writer.close()
        stats.storage_wait_seconds = writer.wait_seconds
        stats.adapter_fuses = generator.fusion.stats.fuses - fusion_before[0]
        stats.adapter_seconds = generator.fusion.stats.seconds - fusion_before[1]
        stats.cached_steps = generator.cached_steps - cached_before[0]
        stats.cached_steps_computed = generator.cached_steps_computed - cached_before[1]
    memory = gpu_memory_gib(plan.device)
    stats.peak_gpu_gib = memory[1] if memory else None
    stats.generated = sum(record.status == OK for record in stats.records)
    stats.failed = sum(record.status == FAILED for record in stats.records)
    stats.seconds = time.perf_counter() - started
    log.info(
        "denoise: %d images, %d failed, %.1f s (%.2f s per image, %.1f s waiting on storage, %d adapter sets "
        "fused in %.1f s)",
        stats.generated,
        stats.failed,
        stats.seconds,
        stats.seconds / max(len(requests), 1),
        stats.storage_wait_seconds,
        stats.adapter_fuses,
        stats.adapter_seconds,
    )
    return stats


def _record(plan: RunPlan, request: Request, **outcome: Any) -> Record:
    if plan.transformer_file is not None:
        outcome = {**plan.transformer_file.describe(), **outcome}
    return Record.for_request(request, plan.source.name, plan.fingerprints[request.id], **outcome)


def _failure(plan: RunPlan, request: Request, error: Exception) -> Record:
    return _record(plan, request, status=FAILED, error=f"{type(error).__name__}: {error}")


def _batches(plan: RunPlan, rows, writer: BatchWriter, requests: list[Request]) -> list[list[Any]]:
    """Rows resolved by the family's view of the cache (edit rows: their output size and input grids, from
    the cache's notes, a few bytes per input) and grouped into batches; a row whose input could not be used
    fails here with stage 1's reason."""
    resolved, failed = [], []
    for request in requests:
        try:
            resolved.append(rows.resolve(request))
        except QwenBatchError as error:
            failed.append(_failure(plan, request, error))
    if failed:
        writer.submit_failures(failed)
    return make_batches(resolved, plan.batch_size)


def _generate_batch(
    plan: RunPlan,
    generator: ImageGenerator,
    writer: BatchWriter,
    batch: list[Any],
    source,
) -> None:
    # A row whose cached inputs cannot be read fails alone; the rest of the batch still runs.
    started = time.perf_counter()
    rows = []
    kept = []  # the items of `rows`, to retry in halves if the GPU runs out of memory
    failed = []
    for item in batch:
        try:
            rows.append(source.load(item))
        except QwenBatchError as error:
            failed.append(_failure(plan, _request_of(item), error))
            continue
        kept.append(item)
    if failed:
        writer.submit_failures(failed)
    if not rows:
        return
    ready = [row.request for row in rows]
    try:
        images = generator.generate(
            ready,
            [row.prompt for row in rows],
            [row.negative for row in rows] if ready[0].uses_cfg else None,
            source.conditions(rows, kept),
        )
    except Exception as error:  # a failing batch must not stop the others; its rows carry the error
        if not (is_out_of_memory(error) and len(ready) > 1):
            log.warning("batch of %d rows (first id %r) failed: %s", len(ready), ready[0].id, error, exc_info=True)
            writer.submit_failures([_failure(plan, request, error) for request in ready])
            return
        images = None  # out of GPU memory: retried below, once the error no longer holds the attempt's tensors
    if images is None:
        retry_in_halves(kept, lambda half: _generate_batch(plan, generator, writer, half, source), plan.device)
        return
    computed = getattr(images, "steps_computed", None) or [(None, None)] * len(rows)  # rows with a step cache
    images = source.finished(images, rows)
    seconds = (time.perf_counter() - started) / len(ready)
    records = []
    for row, (steps, uncond_steps) in zip(rows, computed, strict=True):
        record = _record(plan, row.request, seconds=seconds, warning=TRUNCATION_WARNING if row.truncated else "")
        record.input_sha256 = row.input_sha256
        record.steps_computed, record.uncond_steps_computed = steps, uncond_steps
        records.append(record)
    writer.submit(ready, images, records)


def finalize(plan: RunPlan, encode: EncodeStats, denoise: DenoiseStats) -> Summary:
    """Merge part files into results.parquet (one row per manifest row) and summarise the run.

    A shard does not merge (shards run concurrently and the merge removes the part files it folds
    in): its summary covers its own rows, and the unsharded run that follows merges everything.
    """
    records, parts = plan.store.previous_records()
    if plan.config.is_shard:
        missing = Record(id=None, status=FAILED, error="not generated")
        rows = [
            (r.index, r.id, records.get(r.id, missing).status, records.get(r.id, missing).error)
            for r in plan.todo + plan.skipped
        ]
        results = plan.output.display(PARTS_FOLDER)
        write_shard_stats(plan.output, plan.config.shard, encode, denoise)  # for the fan-out's merge to sum
    else:
        table = plan.store.merge(plan.manifest, records, parts)
        columns = [table.column(name).to_pylist() for name in ("id", "status", "error")]
        rows = [(index, *row) for index, row in enumerate(zip(*columns, strict=True))]
        results = plan.output.display(RESULTS_FILE)
    statuses = [status for _, _, status, _ in rows]
    return Summary(
        rows=len(rows),
        generated=denoise.generated,
        skipped=len(plan.skipped),
        invalid=statuses.count(INVALID),
        failed=statuses.count(FAILED),
        encode=encode,
        denoise=denoise,
        output=plan.output.display(),
        results=results,
        problems=[row for row in rows if row[2] != OK],
        outputs={
            "output_format": plan.output_format,
            "image_format": plan.encoder.format.value,
            "marks": plan.encoder.marks,
        },
    )


def run(config: RunConfig, progress: Progress | None = None) -> Summary:
    """The whole job, as `qwen-batch run` does it."""
    plan = plan_run(config)
    log.info(
        "%d rows: %d to generate, %d already done, %d invalid",
        plan.manifest.num_rows,
        len(plan.todo),
        len(plan.skipped),
        len(plan.manifest.invalid),
    )
    encode = encode_stage(plan, progress=progress)
    denoise = denoise_stage(plan, progress=progress)
    return finalize(plan, encode, denoise)


# One transformer per process, reused across calls (a flow runs many chunks in one worker).
_loaded: dict[tuple[Any, ...], ImageGenerator] = {}


def generator_for(plan: RunPlan) -> ImageGenerator:
    """The generator a plan's denoise stage uses (loaded once, then reused): its model, transformer file and
    ControlNet in its memory placement."""
    return load_generator(
        plan.source, plan.device, plan.dtype, plan.memory.denoiser, plan.transformer_file, plan.controlnet
    )


def load_generator(
    source: ModelSource,
    device: str,
    dtype: torch.dtype,
    placement: Placement | None = None,
    transformer_file: TransformerFile | None = None,
    controlnet: ControlNetSource | None = None,
) -> ImageGenerator:
    key = (source.location, device, str(dtype), placement, transformer_file, controlnet)
    if key not in _loaded:
        release_generator()
        generator_class = model_family(source).generator_class()  # the family's denoise stage
        _loaded[key] = generator_class(source, device, dtype, placement, transformer_file, controlnet)
        log.info("denoise: transformer %s", _loaded[key].memory_mode)
        memory = gpu_memory_gib(device)
        if memory:
            log.info("denoise: transformer and VAE loaded: %.2f GiB allocated on %s", memory[0], device)
    return _loaded[key]


def release_generator() -> None:
    """Free the loaded generator's models, and its compiled graphs first where it compiled: they hold the models,
    and every block of a family shares one code object, whose graphs dynamo caps at 8, so the next generator in
    this process (tests, a notebook, a flow's second run) would meet the old graphs and stop at that cap."""
    while _loaded:
        _, generator = _loaded.popitem()
        if generator.placement.compile:
            import torch

            torch._dynamo.reset()
        generator.close()
