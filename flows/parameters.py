"""The flows' parameters: one pydantic model per flow, shown by the Prefect UI as the run form.

Each field has a type, a default, limits and a description; unknown fields are refused
(extra="forbid"). `flat_parameters` turns a model into a flow's keyword parameters (see there why).
Storage credentials are never parameters: the server stores and shows parameters, so credentials
come from the worker's environment (AWS_PROFILE, AWS_ACCESS_KEY_ID...) as for the AWS CLI.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from qwen_batch.adapters.loras import MAX_LORA_SCALE, MAX_LORAS_PER_ROW, MIN_LORA_SCALE, run_lora
from qwen_batch.io.storage import StorageOptions, s3_storage_options
from qwen_batch.manifest import MAX_SCHEDULER_SHIFT, MIN_SCHEDULER_SHIFT
from qwen_batch.pipeline.step_cache.spec import normalized
from qwen_batch.run.engine import DEFAULT_MODEL, RunConfig

# The first run's manifest: eight rows that show the features in under a minute on a laptop CPU.
# prompts/example.parquet (24 prompts at full sizes and 50 steps) is the one for real use.
DEMO_MANIFEST = "prompts/demo.parquet"
DEMO_OUTPUT = "out/demo"
SHARD_DEPLOYMENT = "qwen-image-batch/shard"


def _check_step_cache(value: str | None) -> str | None:
    return normalized(value)  # a StepCacheError is a ValueError: pydantic reports it on the field


def _check_shard(value: str) -> str:
    index, count = (int(part) for part in value.split("/"))
    if not 0 <= index < count:
        raise ValueError(f"shard {value}: K must be from 0 to N - 1 (e.g. 0/2 and 1/2)")
    return value


class LoraParameter(BaseModel):
    """One run-wide LoRA adapter."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1,
        description="The adapter's .safetensors file on the worker (relative to its working directory) or a URL "
        "such as s3://bucket/loras/style.safetensors; diffusers, kohya, ComfyUI or DiffSynth keys.",
    )
    scale: float = Field(1.0, ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE, description="How strongly it applies.")


class JobParameters(BaseModel):
    """What any run over a manifest needs."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(
        DEMO_MANIFEST,
        min_length=1,
        description="Parquet manifest of prompts, one row per image: a path (relative to the worker's working "
        "directory, the repository root) or a URL such as s3://bucket/prompts.parquet. Columns: docs/manifest.md.",
    )
    output: str = Field(
        DEMO_OUTPUT,
        min_length=1,
        description="Output folder, a path or URL: the images (images/ID.png) and results.parquet go here. "
        "Running again over the same folder resumes: finished rows are skipped.",
    )
    model: str = Field(
        DEFAULT_MODEL,
        min_length=1,
        description="Qwen/Qwen-Image (a hub id, downloaded once per worker), a diffusers folder on the worker, "
        "or 'tiny': random weights for trying the pipeline (its images are noise).",
    )
    transformer: str | None = Field(
        None,
        description="The transformer from one file on the worker (path) or a URL such as s3://bucket/models/"
        "qwen-image-Q4_K_M.gguf: safetensors in bf16 or fp8 e4m3fn (ComfyUI's qwen_image_fp8_e4m3fn.safetensors) "
        "or GGUF (Q8_0 ... Q3_K_M). Copied once per worker; the rest of the model comes from 'model'. Empty: "
        "the model's own transformer.",
    )
    controlnet: str | None = Field(
        None,
        description="The ControlNet of rows with a control_image column: a hub id such as "
        "InstantX/Qwen-Image-ControlNet-Union or a folder on the worker. Empty: rows with control images are "
        "reported invalid, the others run.",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Images per transformer batch; empty: the memory planner's choice for the worker's GPU "
        "(4 when the model is resident, more when weights stream from host RAM, so each copy serves more images).",
    )
    chunk_size: int = Field(
        32,
        ge=1,
        le=1000,
        description="Rows per denoise task: the unit of progress, retries and task runs in the UI. Chunks hold "
        "whole batches, so 10,000 prompts make a few hundred tasks, not 10,000.",
    )
    encode_batch_size: int = Field(16, ge=1, le=256, description="Prompts per text-encoder batch.")
    cache: str | None = Field(
        None,
        description="Embedding cache folder (path or URL) to share between runs and manifests; empty: OUTPUT/cache.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (the GPU when there is one), cuda, cuda:N or cpu. Give each worker its GPU with "
        "CUDA_VISIBLE_DEVICES rather than choosing one here.",
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on a GPU, fp32 on the CPU (fp16 overflows in Qwen-Image)."
    )
    memory_mode: Literal["auto", "bf16", "fp8", "gguf", "offload", "fp8-offload", "sequential"] = Field(
        "auto",
        description="auto: the plan for the worker's GPU and RAM (qwen-batch plan); bf16 resident; fp8 linears in "
        "float8; gguf: a GGUF transformer file resident; offload: weights streamed from host RAM in large batches "
        "(pinned as far as the RAM allows, the rest read from disk); fp8-offload: the same with fp8 weights, half "
        "the bytes; sequential: last resort. docs/memory.md.",
    )
    fp8_every_linear: bool = Field(
        False,
        description="When the mode is fp8: the image MLP's last linear in fp8 too, which fp8 otherwise keeps in "
        "bf16 for quality: 1.94x the diffusers recipe on an H200 against 1.76x. Check the images first (docs/memory.md).",
    )
    task: Literal["auto", "generate", "edit"] = Field(
        "auto",
        description="generate (text to image) or edit (Qwen-Image-Edit: an input image per row); auto: edit when "
        "the manifest has an 'image' or 'images' column.",
    )
    allow_inputs: list[str] = Field(
        [],
        description="Edit manifests: folders or URL prefixes (s3://bucket/inputs/) input images may also come "
        "from; by default only the manifest's own folder is allowed.",
    )
    max_input_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Edit manifests: input images with more pixels are refused (decompression bombs).",
    )
    loras: list[LoraParameter] = Field(
        [],
        max_length=MAX_LORAS_PER_ROW,
        description="LoRA adapters fused for the rows whose 'loras' column is empty, each {path, scale}: e.g. a "
        "Lightning LoRA with scheduler_shift 3 for 8-step rows. docs/manifest.md.",
    )
    scheduler_shift: float | None = Field(
        None,
        gt=MIN_SCHEDULER_SHIFT,
        le=MAX_SCHEDULER_SHIFT,
        description="A fixed sampling shift for the rows whose 'scheduler_shift' column is empty; 3 for the "
        "Lightning LoRAs (with true_cfg_scale 1 and 8 or 4 steps). Empty: the model's own schedule.",
    )
    step_cache: Annotated[str | None, AfterValidator(_check_step_cache)] = Field(
        None,
        description="Step caching for the rows whose 'step_cache' column is empty, decided row by row: none "
        "(empty), first-block:T[,warmup=N] (diffusers' FirstBlockCache, e.g. first-block:0.1: 0.05-0.2 is what "
        "users of the real model report; warmup=N: the first N steps always compute) or taylorseer (e.g. "
        "taylorseer:interval=5,warmup=3,order=1). Faster 50-step rows, lossy: judge the images. docs/step-cache.md.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://minio:9000; empty: AWS_ENDPOINT_URL, else AWS."
    )
    s3_region: str | None = Field(None, description="S3 region; empty: AWS_REGION or the profile's.")
    s3_profile: str | None = Field(None, description="A profile of the worker's ~/.aws/config; empty: AWS_PROFILE.")
    s3_anonymous: bool = Field(False, description="Use S3 without credentials (public buckets).")

    def storage_options(self) -> StorageOptions:
        return s3_storage_options(self.s3_endpoint_url, self.s3_region, self.s3_profile, self.s3_anonymous)

    def job_fields(self) -> dict[str, Any]:
        """The fields of `JobParameters` only, e.g. to pass on to a shard run."""
        return self.model_dump(include=set(JobParameters.model_fields))


class BatchParameters(JobParameters):
    """The parameters of `qwen-image-batch`."""

    shard: Annotated[str, AfterValidator(_check_shard)] = Field(
        "0/1",
        pattern=r"^\d+/\d+$",
        description="Generate only shard K of N ('K/N'): the rows dealt to K by predicted GPU time. 0/1: every row. A shard "
        "leaves its results as part files; qwen-image-fanout (or a run with 0/1) merges them.",
    )

    @property
    def is_shard(self) -> bool:
        return self.shard_numbers[1] > 1

    @property
    def shard_numbers(self) -> tuple[int, int]:
        index, count = self.shard.split("/")
        return int(index), int(count)

    def run_config(self) -> RunConfig:
        index, count = self.shard_numbers
        return RunConfig(
            manifest=self.manifest,
            output=self.output,
            model=self.model,
            transformer=self.transformer or None,
            controlnet=self.controlnet or None,
            batch_size=self.batch_size,
            encode_batch_size=self.encode_batch_size,
            device=self.device,
            dtype=self.dtype,
            cache=self.cache or None,
            storage_options=self.storage_options(),
            shard_index=index,
            shard_count=count,
            task=None if self.task == "auto" else self.task,
            allowed_inputs=tuple(self.allow_inputs),
            max_input_pixels=self.max_input_pixels,
            memory_mode=self.memory_mode,
            fp8_every_linear=self.fp8_every_linear,
            loras=tuple(run_lora(lora.path, lora.scale, "loras") for lora in self.loras),
            scheduler_shift=self.scheduler_shift,
            step_cache=self.step_cache,
        )


class FanoutParameters(JobParameters):
    """The parameters of `qwen-image-fanout`: the job, and how to split it."""

    shards: int = Field(
        2,
        ge=1,
        le=256,
        description="How many shard runs to start, usually one per GPU worker of the pool. Keep the same number "
        "when running again to resume: it decides which rows each shard has.",
    )
    shard_deployment: str = Field(
        SHARD_DEPLOYMENT, pattern=r"^[^/]+/[^/]+$", description="The deployment that runs one shard: FLOW/DEPLOYMENT."
    )
    poll_seconds: float = Field(10.0, ge=0.5, le=600, description="How often to check on the shard runs.")
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        le=4096,
        description="The GPU memory of each shard's worker, in GiB. Given, the parent plans the shards as "
        "`qwen-batch plan --gpus SHARDS --gpus-per-host 1` does: every shard gets the same memory mode and batch size, "
        "and the report predicts the images per hour. Empty: each shard plans for the GPU it lands on.",
    )
    host_memory_gib: float | None = Field(
        None,
        gt=0,
        le=65536,
        description="With gpu_memory_gib: the host RAM each shard's worker may use, in GiB (a pod's memory limit). "
        "Empty: not a limit.",
    )

    def shard_parameters(self, index: int) -> dict[str, Any]:
        """The parameters of the run of shard `index` (a BatchParameters)."""
        return {**self.job_fields(), "shard": f"{index}/{self.shards}"}


M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")


def flat_parameters(model: type[M]) -> Callable[[Callable[[M], R]], Callable[..., R]]:
    """Make the fields of `model` the keyword parameters of a flow function that takes one `model`.

    Why flat: `prefect deployment run NAME --param manifest=... --param output=...` sets top-level
    parameters, so a flow taking one `params: Model` argument could only be run with
    `--param params='{...}'`. Why one model: it alone owns names, types, defaults, limits and
    descriptions, and refuses unknown fields (extra="forbid").

    So the returned function's signature is the model's fields, their annotations carrying their
    limits: Prefect's parameter schema has them (the UI form; the server checks `--param` values
    against it when a run is created) and Prefect validates them before the flow starts. Its
    docstring lists the descriptions, where Prefect reads parameter descriptions from. Prefect refuses
    unknown parameters (the CLI names them; a run created through the API fails before it starts),
    and the body builds the model, which checks everything once more.
    """

    def decorate(function: Callable[[M], R]) -> Callable[..., R]:
        def flow_function(**values: Any) -> R:
            return function(model(**values))

        flow_function.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if field.is_required() else field.default,
                    annotation=Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation,
                )
                for name, field in model.model_fields.items()
            ]
        )
        described = (f"    {name}: {' '.join(field.description.split())}" for name, field in model.model_fields.items())
        flow_function.__doc__ = f"{inspect.getdoc(function)}\n\nArgs:\n" + "\n".join(described)
        for attribute in ("__module__", "__name__", "__qualname__"):
            setattr(flow_function, attribute, getattr(function, attribute))
        return flow_function

    return decorate
