"""A real Prefect server, its work pools, the deployments and process workers, for the flows' tests.

`PrefectStack` starts `prefect server start` on a free loopback port with its own PREFECT_HOME
(SQLite), runs the `prefect` CLI against it from the repository root as the README does, and starts
workers. `stop` kills every process it started and their descendants (a worker's flow runs run in
sessions of their own); the test fixture calls it in its finalizer, so it runs when a test fails too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil  # a dependency of accelerate, so always installed with qwen-batch

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrefectStack:
    def __init__(self, folder: Path, qwen_batch_home: Path):
        self.folder = folder
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(folder / "prefect-home"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",  # no nightly runs of their own mid-test
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_CLI_COLORS": "false",
            "PREFECT_LOGGING_COLORS": "false",
            "COLUMNS": "250",  # the CLI wraps its output to the terminal width
            "QWEN_BATCH_HOME": str(qwen_batch_home),
            "HF_HUB_OFFLINE": "1",
        }
        self.processes: dict[str, subprocess.Popen] = {}

    # -- processes ---------------------------------------------------------------------------------

    def spawn(self, name: str, command: list[str], **env: str) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=REPO,
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def start_server(self, timeout: float = 120.0) -> None:
        server = self.spawn("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited with {server.returncode}:\n{self.log('server')}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"prefect server did not answer within {timeout} s:\n{self.log('server')}")

    def start_worker(self, name: str, pool: str, limit: int | None = None, **env: str) -> None:
        command = [PREFECT, "worker", "start", "--pool", pool, "--name", name, "--type", "process"]
        self.spawn(name, command + (["--limit", str(limit)] if limit else []), **env)

    def stop(self) -> None:
        """Kill everything started here, and what it started, by process id."""
        for process in self.processes.values():
            if process.poll() is not None:
                continue
            try:
                family = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                family = []
            os.killpg(process.pid, signal.SIGKILL)
            for child in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            process.wait(timeout=30)

    def log(self, name: str, tail: int = 6000) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {name} ---\n{self.log(name, 3000)}" for name in self.processes)

    # -- the CLI and the API -----------------------------------------------------------------------

    def prefect(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        """`prefect ARGS` from the repository root, against this server (with `env` added)."""
        return subprocess.run(
            [PREFECT, *args], cwd=REPO, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout
        )

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.request(method, f"{self.api_url}{path}", json=body, timeout=30)
        response.raise_for_status()
        return response.json()

    def flow_runs(self, **flow_run_filter: Any) -> list[dict[str, Any]]:
        return self.api("POST", "/flow_runs/filter", {"flow_runs": flow_run_filter, "sort": "START_TIME_ASC"})

    def task_runs(self, flow_run_id: str) -> list[dict[str, Any]]:
        body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
        return self.api("POST", "/task_runs/filter", body)

    def artifacts(self, flow_run_id: str) -> dict[str, dict[str, Any]]:
        """The run's artifacts by key."""
        body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        return {artifact["key"]: artifact for artifact in self.api("POST", "/artifacts/filter", body)}

    def run_logs(self, flow_run_id: str) -> str:
        body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
        return "\n".join(entry["message"] for entry in self.api("POST", "/logs/filter", body))
