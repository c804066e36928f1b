"""The GPU worker image (deployments/Dockerfile), its install script and the Kubernetes job template agree.

These checks read the files and need no container engine: the image installs only through the script
CI runs (.ci/run), dependencies before the source, runs as a non-root user, and keeps its caches where
the job template mounts volumes. tests/test_worker_image_run.py builds the image and runs it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "deployments" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def script_commands(path: Path) -> list[str]:
    """The command lines of a shell script, continuation lines joined, comments (whole-line or trailing) dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [re.sub(r"(^|\s)#.*", "", line).strip() for line in text.splitlines()]
    return [line for line in lines if line]


def environment() -> dict[str, str]:
    variables = {}
    for kind, arguments in instructions():
        if kind == "ENV":
            variables |= dict(re.findall(r"(\w+)=(\S+)", arguments))
    return variables


def test_the_image_installs_through_the_script_that_ci_runs_torch_then_dependencies_then_the_source():
    steps = instructions()
    installs = [n for n, (kind, arguments) in enumerate(steps) if kind == "RUN" and "pip" in arguments]
    assert not installs, "pip outside deployments/install-worker.sh: CI would not test it"
    torch, dependencies, project = (
        next(
            n
            for n, (kind, arguments) in enumerate(steps)
            if kind == "RUN" and f"install-worker.sh --{stage}" in arguments
        )
        for stage in ("torch", "dependencies", "project")
    )
    copies = [(n, arguments.split()[:-1]) for n, (kind, arguments) in enumerate(steps) if kind == "COPY"]
    copied_before = lambda step: {name for n, names in copies if n < step for name in names}  # noqa: E731
    # Each layer sees only the files it depends on: torch's (GBs) survives a dependency change, and the
    # dependencies' survives a source change.
    assert copied_before(torch) == {"deployments/install-worker.sh"}
    assert copied_before(dependencies) == {"pyproject.toml", "constraints.txt", "deployments/install-worker.sh"}
    assert any(names == ["."] for n, names in copies if dependencies < n < project)
    ci = (REPO / ".ci" / "run").read_text()
    assert "deployments/install-worker.sh" in ci  # both stages, in a fresh environment
    commands = script_commands(REPO / "deployments" / "install-worker.sh")
    assert "extras=${EXTRAS:-gpu,gguf,control}" in commands
    assert any('--constraint "$repo/constraints.txt"' in line for line in commands)
    # Bytecode at build time: the dependencies' (stages 1, 2) and the project's (stage 3), by commands, not comments.
    compiles = [line for line in commands if line.startswith('"$venv/bin/python" -m compileall ')]
    assert any('"$venv/lib"' in line for line in compiles), compiles
    assert any('"$repo/qwen_batch"' in line for line in compiles), compiles


def test_the_image_runs_as_a_user_and_keeps_its_caches_on_volumes():
    users = [arguments for kind, arguments in instructions() if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    variables = environment()
    volumes = json.loads(next(arguments for kind, arguments in instructions() if kind == "VOLUME"))
    # QWEN_BATCH_HOME too: transformer files copied from URLs (tens of GB) must not fill the container's disk.
    for name in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "QWEN_BATCH_HOME"):
        assert any(f"{variables[name]}/".startswith(f"{volume}/") for volume in volumes), name
    assert variables["PATH"].startswith("/opt/venv/bin")


def test_the_job_template_mounts_volumes_where_the_image_keeps_its_caches():
    template = json.loads((REPO / "deployments" / "k8s" / "job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    mounts = {mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]}
    variables = environment()
    assert {variables["HF_HOME"], variables["TORCHINDUCTOR_CACHE_DIR"]} <= mounts
    assert any(f"{variables['QWEN_BATCH_HOME']}/".startswith(f"{mount}/") for mount in mounts)
    workdir = [arguments for kind, arguments in instructions() if kind == "WORKDIR"][-1]
    assert f"directory: {workdir}" in (REPO / "deployments" / "prefect-k8s.yaml").read_text()
    user = next(arguments for kind, arguments in instructions() if kind == "RUN" and "useradd" in arguments)
    assert f"--uid {pod['securityContext']['runAsUser']}" in user


def test_a_local_folder_the_user_cannot_write_is_reported_as_such_not_as_s3_credentials():
    """The image's working directory is read-only to its user, so a run whose output is relative (the
    nightly deployment's default, out/nightly) is refused there: the message must say whose permission is
    missing, not send the user to check S3 credentials. tests/test_worker_image_run.py sees it in the image."""
    from qwen_batch.io.storage import describe

    denied = PermissionError(13, "Permission denied", "/opt/qwen-batch/out")
    local = describe(denied, "/opt/qwen-batch/out/nightly")
    assert (
        f"access denied ([Errno 13] Permission denied: '/opt/qwen-batch/out'); the user running qwen-batch (uid {os.getuid()})"
        in local
    )
    assert "AWS" not in local and "bucket" not in local
    assert "check the credentials" in describe(PermissionError("Forbidden"), "s3://bucket/out")


def test_the_build_context_leaves_out_what_the_host_built():
    """`COPY . /opt/qwen-batch` must not take the host's environment or build output: setuptools builds in
    the tree and installs what build/lib holds, so a stale build/ from the host (CI's install step leaves
    one) would put deleted or old modules into the image."""
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "build", "*.egg-info", "**/__pycache__", ".git"} <= ignored
