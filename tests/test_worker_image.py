"""The GPU worker image (deployments/Dockerfile), its install script and the Kubernetes job template agree.

The image cannot be built on these machines (no container engine, and the CUDA base image's registry is
out of reach): CI runs its one install step, deployments/install-worker.sh, instead (.ci/run). These
checks keep the three files from drifting apart: the image installs only through that script, runs as
a non-root user, and keeps its caches where the job template mounts volumes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "deployments" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def environment() -> dict[str, str]:
    variables = {}
    for kind, arguments in instructions():
        if kind == "ENV":
            variables |= dict(re.findall(r"(\w+)=(\S+)", arguments))
    return variables


def test_the_image_installs_through_the_script_that_ci_runs():
    runs = [arguments for kind, arguments in instructions() if kind == "RUN"]
    installs = [run for run in runs if "pip" in run or "install-worker.sh" in run]
    assert len(installs) == 1 and "deployments/install-worker.sh" in installs[0]
    assert "deployments/install-worker.sh" in (REPO / ".ci" / "run").read_text()
    script = (REPO / "deployments" / "install-worker.sh").read_text()
    assert "constraints.txt" in script and "compileall" in script and "[${EXTRAS:-gpu,gguf}]" in script


def test_the_image_runs_as_a_user_and_keeps_its_caches_on_volumes():
    users = [arguments for kind, arguments in instructions() if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    variables = environment()
    volumes = " ".join(arguments for kind, arguments in instructions() if kind == "VOLUME")
    for name in ("HF_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        assert variables[name] in volumes, name
    assert variables["PATH"].startswith("/opt/venv/bin")


def test_the_job_template_mounts_volumes_where_the_image_keeps_its_caches():
    template = json.loads((REPO / "deployments" / "k8s" / "job-template.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    mounts = {mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]}
    variables = environment()
    assert {variables["HF_HOME"], variables["TORCHINDUCTOR_CACHE_DIR"]} <= mounts
    workdir = [arguments for kind, arguments in instructions() if kind == "WORKDIR"][-1]
    assert f"directory: {workdir}" in (REPO / "deployments" / "prefect-k8s.yaml").read_text()
    user = next(arguments for kind, arguments in instructions() if kind == "RUN" and "useradd" in arguments)
    assert f"--uid {pod['securityContext']['runAsUser']}" in user
