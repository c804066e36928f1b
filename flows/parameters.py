"""The flows' parameters: one pydantic model per flow, shown by the Prefect UI as the run form.

The run options are not declared here: every field of `qwen_batch.run.config.RunConfig` that is a run
option becomes a parameter, with its type, default, limits and description (`run_option_fields`), so the
CLI, the flows and the engine cannot drift apart. Only what exists for the flows alone is declared below
(`chunk_size`, the C2PA Secret blocks, the fan-out's own fields) and the one option whose form differs: `loras`,
a list of {path, scale} objects in the UI where the CLI takes PATH[:SCALE] texts.

Unknown fields are refused (extra="forbid"). `flat_parameters` turns a model into a flow's keyword
parameters (see there why). Storage credentials are never parameters: the server stores and shows
parameters, so credentials come from the worker's environment (AWS_PROFILE, AWS_ACCESS_KEY_ID...) as for
the AWS CLI. Likewise a C2PA signing key is never a parameter: `c2pa_cert_secret` and `c2pa_key_secret` name
Prefect Secret blocks that hold the PEM texts, loaded by the run that signs (`content_credentials`).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

from qwen_batch.adapters.loras import MAX_LORA_SCALE, MIN_LORA_SCALE, run_lora
from qwen_batch.errors import ConfigError
from qwen_batch.io.storage import StorageOptions, s3_storage_options
from qwen_batch.run.config import Option, RunConfig, option_default, option_types, run_options

if typing.TYPE_CHECKING:
    from qwen_batch.outputs.content_credentials import ContentCredentials

SHARD_DEPLOYMENT = "qwen-image-batch/shard"


class LoraParameter(BaseModel):
    """One run-wide LoRA adapter."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1,
        description="The adapter's .safetensors file on the worker (relative to its working directory) or a URL "
        "such as s3://bucket/loras/style.safetensors; diffusers, kohya, ComfyUI or DiffSynth keys.",
    )
    scale: float = Field(1.0, ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE, description="How strongly it applies.")


# The option whose flow form differs from its engine form, and how a flow value becomes the engine's.
FLOW_TYPES: dict[str, Any] = {"loras": list[LoraParameter]}


def _engine_value(name: str, value: Any) -> Any:
    if name == "loras":
        return tuple(run_lora(lora.path, lora.scale, "loras") for lora in value)
    if value == "" and option_default(name) is None:  # an emptied text box: the option's default
        return None
    return value


def _flow_field(name: str, how: Option, kind: Any) -> tuple[Any, Any]:
    """One run option as a pydantic field: its annotation (choices as a Literal) and its `Field`."""
    optional = type(None) in typing.get_args(kind)
    if name in FLOW_TYPES:
        kind = FLOW_TYPES[name]
    elif typing.get_origin(kind) is tuple:
        kind = list[typing.get_args(kind)[0]]
    elif how.choices is not None:
        kind = Literal[how.choices] | None if optional else Literal[how.choices]
    if how.check is not None:
        kind = Annotated[kind, AfterValidator(how.check)]  # its ValueError is reported on the field
    default = option_default(name)
    default = how.flow_default if default is MISSING else default
    default = list(default) if isinstance(default, tuple) else default
    limits = {
        "ge": how.minimum,
        "le": how.maximum,
        "gt": how.above,
        "pattern": how.pattern,
        "max_length": how.max_items,
    }
    limits = {key: value for key, value in limits.items() if value is not None}
    return kind, Field(default, description=how.help, **limits)


def run_option_fields(exclude: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """Every run option that is a flow parameter, as `create_model` takes fields, in declaration order."""
    types = option_types()
    return {
        name: _flow_field(name, how, types[name]) for name, how in run_options() if how.flow and name not in exclude
    }


class _Job(BaseModel):
    """What any run over a manifest needs (the fields are added by `create_model` below)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _c2pa_from_one_place(self) -> _Job:
        """The C2PA certificate and key come from two Secret blocks or from two files, never half of each."""
        cert_secret, key_secret = self.c2pa_cert_secret or None, self.c2pa_key_secret or None
        if (cert_secret is None) != (key_secret is None):
            raise ValueError(
                "c2pa_cert_secret and c2pa_key_secret go together: name both Secret blocks (the certificate chain's "
                "and the private key's PEM text), or neither"
            )
        if cert_secret is not None and (self.c2pa_cert or self.c2pa_key):
            raise ValueError(
                "C2PA credentials from Secret blocks (c2pa_cert_secret, c2pa_key_secret) or from files on the worker "
                "(c2pa_cert, c2pa_key), not both: leave one pair empty"
            )
        return self

    def content_credentials(self) -> ContentCredentials | None:
        """The C2PA signer made from the Secret blocks `c2pa_cert_secret` and `c2pa_key_secret`, checked (one
        signature, as for files); None when they are not given. The key's text stays in the returned object:
        never in a parameter, a log line, an error message, an artifact or a result."""
        if not self.c2pa_cert_secret:
            return None
        from qwen_batch.outputs.content_credentials import ContentCredentials

        cert_name = f"c2pa_cert_secret {self.c2pa_cert_secret!r}"
        key_name = f"c2pa_key_secret {self.c2pa_key_secret!r}"
        cert = _secret_pem(self.c2pa_cert_secret, cert_name)
        key = _secret_pem(self.c2pa_key_secret, key_name)
        return ContentCredentials(cert, key, cert_name=cert_name, key_name=key_name)

    def storage_options(self) -> StorageOptions:
        return s3_storage_options(self.s3_endpoint_url, self.s3_region, self.s3_profile, self.s3_anonymous)

    def job_fields(self) -> dict[str, Any]:
        """The fields of `JobParameters` only, e.g. to pass on to a shard run."""
        return self.model_dump(include=set(JobParameters.model_fields))


def _secret_pem(block: str, parameter: str) -> bytes:
    """The text of Prefect Secret block `block`, as bytes; a ConfigError naming the block (never its value)."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block).get()
    except ValueError as error:  # Prefect's "Unable to find block document named ..."
        raise ConfigError(
            f"{parameter}: no Secret block of that name on the Prefect server ({error}); create it with the PEM text, "
            "e.g. `Secret(value=open('chain.pem').read()).save(NAME)` or in the UI's Blocks page"
        ) from None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{parameter}: the Secret block must hold PEM text (-----BEGIN ...-----), a string")
    return value.encode()


_SECRET_HELP = (
    "Not a file: the key's text never becomes a parameter, log line or artifact. With {other}; not with "
    "c2pa_cert/c2pa_key. Both empty: no C2PA, unless c2pa_cert/c2pa_key are given."
)

JobParameters = create_model(
    "JobParameters",
    __base__=_Job,
    __module__=__name__,
    **run_option_fields(exclude=("shard",)),
    chunk_size=(
        int,
        Field(
            32,
            ge=1,
            le=1000,
            description="Rows per denoise task: the unit of progress, retries and task runs in the UI. Chunks hold "
            "whole batches, so 10,000 prompts make a few hundred tasks, not 10,000. With webdataset or parquet "
            "output a chunk also holds whole shards (each denoise task publishes its last shard partly filled): "
            "chunks are then chunk_size rounded up to a multiple of shard_size rows, at least shard_size.",
        ),
    ),
    c2pa_cert_secret=(
        str | None,
        Field(
            None,
            description="Sign every image with C2PA content credentials whose certificate chain (PEM: the signing "
            "certificate first, then the CAs that issued it) is in this Prefect Secret block, by name. "
            + _SECRET_HELP.format(other="c2pa_key_secret"),
        ),
    ),
    c2pa_key_secret=(
        str | None,
        Field(
            None,
            description="The Prefect Secret block, by name, holding the PEM private key of c2pa_cert_secret's "
            "certificate. " + _SECRET_HELP.format(other="c2pa_cert_secret"),
        ),
    ),
)


class _Batch(JobParameters):
    """The parameters of `qwen-image-batch`: the job, and which shard of it (`shard`, added below)."""

    @property
    def is_shard(self) -> bool:
        return self.shard_numbers[1] > 1

    @property
    def shard_numbers(self) -> tuple[int, int]:
        index, count = self.shard.split("/")
        return int(index), int(count)

    def run_config(self, content_credentials: ContentCredentials | None = None) -> RunConfig:
        """The engine's config of this run; `content_credentials`: the C2PA signer made from the Secret blocks
        (`content_credentials()`), which the engine uses instead of c2pa_cert/c2pa_key files."""
        names = [name for name, how in run_options() if how.flow]
        values = {name: _engine_value(name, getattr(self, name)) for name in names}
        return RunConfig(**values, content_credentials=content_credentials)


def _check_shard(value: str) -> str:
    index, count = (int(part) for part in value.split("/"))
    if not 0 <= index < count:
        raise ValueError(f"shard {value}: K must be from 0 to N - 1 (e.g. 0/2 and 1/2)")
    return value


_shard_kind, _shard_field = run_option_fields()["shard"]
BatchParameters = create_model(
    "BatchParameters",
    __base__=_Batch,
    __module__=__name__,
    shard=(Annotated[_shard_kind, AfterValidator(_check_shard)], _shard_field),
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

    def run_config(self) -> RunConfig:
        """The whole job as one unsharded run: what the parent reads the manifest as, as its shards do."""
        return BatchParameters(**self.job_fields()).run_config()


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
