"""The worker image built and run for real, as a user runs it, without a GPU.

The image is built from deployments/Dockerfile with scripts/build-image.sh (docker, or podman when docker
has no engine; cached layers make a rebuild after a source change take seconds), then, in containers of
it, as its non-root user and on the tiny model:

- `qwen-batch run prompts/demo.parquet --output /data/out` writes the images and results to a mounted
  folder, and the caches go to their named volumes, nothing to the container's own disk;
- `prefect worker start --pool gpu` against a real Prefect server on the host picks up runs of the
  `nightly` deployment started with `prefect deployment run`: they end Completed with the images on
  the volume, and a second run skips every row; the same with the manifest and output on S3 (moto's
  server on the host), the credentials in the worker's environment as the Kubernetes Secret puts them.

Marked `image`: skipped, with the reason, when no container engine answers (scripts/container-engine.sh),
unless QWEN_BATCH_IMAGE_TESTS=required (.ci/run), which makes that a failure.
scripts/build-test-image.sh builds it: the base is BASE_IMAGE if set, else the Debian one
scripts/make-debian-base.sh makes (the default CUDA base cannot be pulled on these machines); TORCH_INDEX_URL
(default empty: the host's pip index), HOST_CONFIG (default 1 with podman) and IMAGE_BUILD_FLAGS pass
through to the build. `make image-test`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.prefect_server import PrefectStack
from tests.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY, keys, read_results

pytestmark = [pytest.mark.image, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
TAG = "localhost/qwen-batch:test"
DEBIAN_BASE = "localhost/qwen-batch-base:bookworm"
USER_ID = 10001  # the image's user (deployments/Dockerfile), as the job template's runAsUser
# The demo manifest: seven rows the tiny model draws, one invalid on purpose (width 1000).
DEMO_OK = [
    "bottle-watercolor",
    "city-rain-wide",
    "fox-moonlight",
    "lighthouse-tall",
    "portrait-negative",
    "poster-lightning",
    "tea-house-zh",
]
TIMINGS: dict[str, float] = {}  # printed at the end of the module: docs/prefect.md quotes them
REPORT: list[str] = []


def skip(reason: str) -> None:
    """Skip, unless QWEN_BATCH_IMAGE_TESTS=required (CI, which installs an engine): then a missing engine fails."""
    if os.environ.get("QWEN_BATCH_IMAGE_TESTS") == "required":
        pytest.fail(f"QWEN_BATCH_IMAGE_TESTS=required, but {reason}")
    pytest.skip(reason)


def engine_or_skip() -> str:
    found = subprocess.run([REPO / "scripts" / "container-engine.sh"], capture_output=True, text=True)
    if found.returncode != 0:
        skip(found.stderr.strip())
    return found.stdout.strip()


def limit(kind: int, most: int) -> int:
    """A resource limit at or below this process's: engines that raise it are refused on these machines."""
    return min(value for value in (*resource.getrlimit(kind), most) if value != resource.RLIM_INFINITY)


class Engine:
    """docker or podman, with the flags every container here needs."""

    def __init__(self, name: str):
        self.name = name
        nofile, nproc = limit(resource.RLIMIT_NOFILE, 65536), limit(resource.RLIMIT_NPROC, 4096)
        # Host networking: the Prefect and S3 servers listen on the host's loopback. Explicit limits: the
        # engines' defaults are above what an unprivileged shell may set here (containers.md).
        self.run_flags = ["--network", "host", "--ulimit", f"nofile={nofile}:{nofile}"]
        self.run_flags += ["--ulimit", f"nproc={nproc}:{nproc}"]
        self.names: list[tuple[str, str]] = []  # (kind, name) of what to remove at the end

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([self.name, *args], capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(
                f"{self.name} {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def volume(self, purpose: str) -> str:
        name = f"qwen-batch-test-{purpose}-{uuid.uuid4().hex[:8]}"
        self("volume", "create", name)
        self.names.append(("volume", name))
        return name

    def container(self, purpose: str) -> str:
        name = f"qwen-batch-test-{purpose}-{uuid.uuid4().hex[:8]}"
        self.names.append(("container", name))
        return name

    def run(self, mounts: dict[str, str], env: dict[str, str], *command: str, **options) -> subprocess.CompletedProcess:
        """`ENGINE run` of the test image: `mounts` maps a volume or host folder to its place inside."""
        flags = [*self.run_flags, *(f"-v{source}:{target}" for source, target in mounts.items())]
        flags += [f"-e{name}={value}" for name, value in env.items()]
        return self("run", *flags, *options.pop("run_options", ()), TAG, *command, **options)

    def listing(self, volume: str, target: str) -> list[str]:
        """The files in a named volume, read through a container (the engine's own paths may be out of reach)."""
        found = self.run({volume: target}, {}, "find", target, "-type", "f", run_options=["--rm"])
        return sorted(found.stdout.split())

    def remove_all(self) -> None:
        for kind, name in reversed(self.names):  # containers first, with their anonymous volumes
            self(kind, "rm", "-f", *(["-v"] if kind == "container" else []), name, check=False)


@pytest.fixture(scope="module")
def engine(pytestconfig: pytest.Config) -> Engine:
    engine = Engine(engine_or_skip())
    yield engine
    engine.remove_all()
    with pytestconfig.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        lines = [*REPORT, *(f"{what}: {seconds:.1f} s" for what, seconds in TIMINGS.items())]
        print("".join(f"\nworker image: {line}" for line in lines))


@pytest.fixture(scope="module")
def image(engine: Engine) -> str:
    """The image built from the working tree (scripts/build-test-image.sh): cached layers make this seconds when
    only the source changed, and no time at all after .ci/run built it."""
    env = {**os.environ, "ENGINE": engine.name}
    no_base = "BASE_IMAGE" not in os.environ and engine("image", "inspect", DEBIAN_BASE, check=False).returncode
    if no_base and not shutil.which("mmdebstrap"):
        skip(f"no base image: set BASE_IMAGE, or apt-get install mmdebstrap to make {DEBIAN_BASE}")
    start = time.monotonic()
    built = subprocess.run(
        [REPO / "scripts" / "build-test-image.sh"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert built.returncode == 0, f"the image did not build:\n{built.stdout[-8000:]}\n{built.stderr[-4000:]}"
    TIMINGS["build (cached layers reused where the inputs did not change)"] = time.monotonic() - start
    REPORT.append(built.stdout.splitlines()[-1])  # "built ... in N s: SIZE"
    return TAG


@pytest.fixture(scope="module")
def caches(engine: Engine, image: str) -> dict[str, str]:
    """Named volumes for the two caches, as `docker run -v qwen-models:/cache/huggingface` makes them."""
    return {engine.volume("models"): "/cache/huggingface", engine.volume("compile"): "/cache/compile"}


def data_folder(tmp_path: Path) -> Path:
    """A host folder for /data that the image's user can write (a pod gets this from its fsGroup)."""
    folder = tmp_path / "data"
    folder.mkdir()
    folder.chmod(0o777)
    return folder


def statuses(results: list[dict]) -> dict[str, str]:
    return {row["id"]: row["status"] for row in results}


def test_the_demo_runs_in_the_image_as_its_user_with_outputs_and_caches_on_volumes(engine, image, caches, tmp_path):
    data = data_folder(tmp_path)
    name = engine.container("demo")
    start = time.monotonic()
    ran = engine.run(
        {**caches, str(data): "/data"},
        {},
        *("qwen-batch", "run", "prompts/demo.parquet", "--output", "/data/out"),
        run_options=["--name", name],
        check=False,
    )
    TIMINGS["qwen-batch run prompts/demo.parquet (8 rows), container start to exit"] = time.monotonic() - start
    assert ran.returncode == 1, ran.stdout + ran.stderr  # the CLI's code for "some rows invalid": bad-size
    out = data / "out"
    assert statuses(pq.read_table(out / "results.parquet").to_pylist()) == {
        **{row: "ok" for row in DEMO_OK},
        "bad-size": "invalid",
    }
    images = sorted((out / "images").glob("*.png"))
    assert [path.stem for path in images] == DEMO_OK
    assert {path.stat().st_uid for path in images} == {USER_ID}  # written by the image's user, not root

    # The tiny model went to the models volume (QWEN_BATCH_HOME lives there), and the container's own disk
    # took nothing at all: a pod's ephemeral storage never fills with models or outputs.
    models = engine.listing(next(iter(caches)), "/cache/huggingface")
    assert any(
        re.search(r"/cache/huggingface/qwen-batch/models/tiny-qwen-image-[^/]+/model_index.json$", path)
        for path in models
    )
    changed = [line.split(None, 1)[1] for line in engine("diff", name).stdout.splitlines()]
    engines_own = ("/etc", "/data", "/cache/huggingface", "/cache/compile")  # resolv.conf, hosts; mount points
    assert [path for path in changed if not path.startswith(engines_own)] == [], changed


def test_an_output_the_user_cannot_write_is_refused_with_whose_permission_is_missing(engine, image):
    # Relative to the working directory, the repository's copy in the image, which its user cannot write.
    ran = engine.run(
        {}, {}, "qwen-batch", "run", "prompts/demo.parquet", "--output", "out/demo", run_options=["--rm"], check=False
    )
    assert ran.returncode == 2, ran.stdout + ran.stderr  # a run-level error: nothing generated
    assert "/opt/qwen-batch/out/demo" in ran.stderr and f"the user running qwen-batch (uid {USER_ID})" in ran.stderr
    assert "AWS" not in ran.stderr


def test_flow_runs_find_every_module_compiled_in_the_image(engine, image):
    """A flow run imports the library beside flows/ (its working directory is the repository's copy), and
    the image's user cannot write __pycache__ under /opt: without bytecode built in, every run compiles
    the library again at start."""
    check = (
        "import importlib.util, os, sys\n"
        "import flows.qwen_image_batch, flows.qwen_image_fanout, qwen_batch.cli, qwen_batch.run.engine\n"
        "for module in list(sys.modules.values()):\n"
        "    source = getattr(module, '__file__', None) or ''\n"
        "    if source.endswith('.py') and not os.path.exists(importlib.util.cache_from_source(source)):\n"
        "        print(source)\n"
    )
    uncompiled = engine.run({}, {}, "python", "-c", check, run_options=["--rm"]).stdout.split()
    assert uncompiled == []


@pytest.fixture(scope="module")
def worker_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return data_folder(tmp_path_factory.mktemp("worker"))


@pytest.fixture(scope="module")
def stack(engine, image, tmp_path_factory, qwen_batch_home):
    """A Prefect server on the host, its two pools, and the deployments made from the image.

    `prefect deploy` runs in the image, as a user with only the image would: the deployments' pull step then
    sets the working directory to the repository's copy in it (/opt/qwen-batch), where the worker runs them."""
    stack = PrefectStack(tmp_path_factory.mktemp("prefect"), qwen_batch_home)
    try:
        stack.start_server()
        for pool in ("gpu", "control"):
            created = stack.prefect("work-pool", "create", pool, "--type", "process")
            assert created.returncode == 0, created.stdout + created.stderr
        deploy = ("prefect", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
        engine.run({}, {"PREFECT_API_URL": stack.api_url}, *deploy, run_options=["--rm"])
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def worker(engine, stack, caches, worker_data, s3_endpoint) -> str:
    """`prefect worker start --pool gpu` in a container of the image; its name. Its environment carries the
    S3 credentials and endpoint, as the job template's Secret does; the engine removes it at the end."""
    name = engine.container("worker")
    env = {"PREFECT_API_URL": stack.api_url, "PREFECT_WORKER_QUERY_SECONDS": "2"}  # polls every 2 s, not 10
    env |= {"AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY}
    env |= {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}
    mounts = {**caches, str(worker_data): "/data"}
    engine.run(mounts, env, "prefect", "worker", "start", "--pool", "gpu", run_options=["-d", "--name", name])
    return name


def run_nightly(
    engine: Engine, stack: PrefectStack, worker: str, what: str, *params: str
) -> tuple[str, dict[str, str]]:
    """`prefect deployment run qwen-image-batch/nightly --param ... --watch` on the host: the flow run's id
    and its summary artifact, after checking it ended Completed."""
    start = time.monotonic()
    args = [arg for param in params for arg in ("--param", param)]
    done = stack.prefect("deployment", "run", "qwen-image-batch/nightly", *args, "--watch", timeout=600)
    TIMINGS[f"{what}, prefect deployment run to Completed"] = time.monotonic() - start
    printed = done.stdout + done.stderr
    worker_log = engine("logs", worker, check=False)
    assert done.returncode == 0, f"{printed}\n--- worker ---\n{worker_log.stdout[-6000:]}{worker_log.stderr[-6000:]}"
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", printed).group(1)
    run = stack.api("GET", f"/flow_runs/{run_id}")
    assert run["state"]["type"] == "COMPLETED" and run["work_pool_name"] == "gpu"
    summary = stack.artifacts(run_id)["qwen-image-batch-summary"]
    return run_id, {row["metric"]: row["value"] for row in json.loads(summary["data"])}


def test_a_worker_in_the_image_runs_the_nightly_deployment_onto_the_volume_then_resumes(
    engine, stack, worker, worker_data
):
    params = ("manifest=prompts/demo.parquet", "output=/data/nightly")  # the manifest in the image
    _, summary = run_nightly(engine, stack, worker, "nightly on the demo manifest", *params)
    assert summary["ok (generated by this run)"] == len(DEMO_OK) and summary["invalid"] == 1
    images = sorted((worker_data / "nightly" / "images").glob("*.png"))
    assert [path.stem for path in images] == DEMO_OK
    assert {path.stat().st_uid for path in images} == {USER_ID}
    written = {path.name: path.stat().st_mtime_ns for path in images}

    _, summary = run_nightly(engine, stack, worker, "nightly again (resumes)", *params)
    assert summary["skipped (already done)"] == len(DEMO_OK) and summary["ok (generated by this run)"] == 0
    assert {path.name: path.stat().st_mtime_ns for path in images} == written  # not one image drawn again


def test_a_worker_in_the_image_runs_the_nightly_deployment_on_s3_then_resumes(engine, stack, worker, s3, bucket):
    # The manifest, the LoRA adapter its poster-lightning row names and the image its bottle-watercolor row
    # starts from, relative to the manifest's folder.
    for path in ("demo.parquet", "loras/tiny-lightning-8step.safetensors", "conditions/bottle.png"):
        s3.put_object(Bucket=bucket, Key=f"in/{path}", Body=(REPO / "prompts" / path).read_bytes())
    params = (f"manifest=s3://{bucket}/in/demo.parquet", f"output=s3://{bucket}/out")
    _, summary = run_nightly(engine, stack, worker, "nightly on S3", *params)
    assert summary["ok (generated by this run)"] == len(DEMO_OK) and summary["invalid"] == 1
    assert keys(s3, bucket, "out/images/") == [f"out/images/{row}.png" for row in DEMO_OK]
    assert statuses(read_results(s3, bucket, "out/results.parquet")) == {
        **{row: "ok" for row in DEMO_OK},
        "bad-size": "invalid",
    }

    _, summary = run_nightly(engine, stack, worker, "nightly on S3 again (resumes)", *params)
    assert summary["skipped (already done)"] == len(DEMO_OK) and summary["ok (generated by this run)"] == 0
