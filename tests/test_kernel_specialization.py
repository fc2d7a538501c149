"""One compiled kernel per configuration, whatever the batch: launch values that change from step to step
(request count, query blocks, refinement round, split count, token count) must reach the Triton kernels as
runtime arguments that Triton does not specialize on, never as constexprs or launch options.

Otherwise every new batch size compiles a new kernel in the middle of serving; on the H200 vLLM's jit_monitor
caught _hip_mask_kernel / _hip_attn_kernel compiling during timed steps (seconds each). The kernels are replaced
by recorders here, so nothing runs: the test checks what the launch wrappers pass, on CPU.
"""
import pytest
import torch

pytest.importorskip("triton")
import kernels.triton_hip as th  # noqa: E402
from kernel_keys import not_specialized  # noqa: E402

KERNELS = ["_hip_mask_init_kernel", "_hip_mask_init_kernel_tiered", "_hip_mask_round_kernel", "_hip_mask_round_kernel_tiered", "_hip_attn_kernel",
           "_hip_attn_kernel_tiered", "_merge_kernel"]
SPLIT_KEYS = {"SPLIT", "num_stages"}


class Recorder:
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((args, kw))


def _launch_all(QB: int, ctx: int, tiered: bool):
    """One decode step of QB requests (one query row each) at context ``ctx``: mask refresh + attention."""
    g = torch.Generator().manual_seed(QB)
    Hkv, G, D, page, pages, width = 2, 4, 32, 16, 512, 256  # the cache and block table are fixed, as in vLLM
    q = torch.randn(QB, Hkv * G, D, generator=g)
    kc, vc = torch.randn(pages, page, Hkv, D, generator=g), torch.randn(pages, page, Hkv, D, generator=g)
    bt = torch.randint(0, pages, (QB, width), dtype=torch.int32, generator=g)
    i32 = lambda x: torch.as_tensor(x, dtype=torch.int32)  # noqa: E731
    req, start, ln = i32(range(QB)), i32(range(QB)), i32([1] * QB)
    seq = i32([ctx - r for r in range(QB)])
    ws = seq - 64
    tier = {}
    if tiered:
        tier = dict(host_k_cache=torch.randn(8, page, Hkv, D), host_v_cache=torch.randn(8, page, Hkv, D))
    idx = th.hip_mask(q, kc, bt, req, start, ln, ws, n_select=8, block_size_q=1, block_size_k=4, sink_tokens=8,
                      norm_window=64, single_launch=False, host_k_cache=tier.get("host_k_cache"))
    th.hip_attention(q, kc, vc, bt, seq, req, start, ln, seq - 1, ws, idx, sink_tokens=8, block_size_k=4,
                     scale=0.1, **tier)


@pytest.mark.parametrize("tiered", [False, True], ids=["one-tier", "two-tier"])
def test_batch_dependent_values_are_unspecialized_runtime_args(monkeypatch, tiered):
    rec = {name: Recorder(getattr(th, name)) for name in KERNELS}
    for name, r in rec.items():
        monkeypatch.setattr(th, name, r)
    monkeypatch.setattr(th, "_is_tiered", lambda host: host is not None)
    monkeypatch.setattr(th, "_tier_args", lambda cache, host: (0, *host.stride()))
    for QB, ctx in [(1, 512), (2, 700), (3, 1024), (6, 1500), (16, 2048), (17, 4000)]:
        _launch_all(QB, ctx, tiered)
    launched = 0
    for name, r in rec.items():
        if not r.calls:
            continue
        launched += 1
        # The one allowed split: split-K on or off (SPLIT and its pipeline depth), i.e. at most two kernels.
        options = {repr(sorted((k, v) for k, v in kw.items() if k not in SPLIT_KEYS)) for _, kw in r.calls}
        assert len(options) == 1, f"{name}: constexprs / launch options change with the batch: {options}"
        assert len({repr(sorted((k, v) for k, v in kw.items() if k in SPLIT_KEYS)) for _, kw in r.calls}) <= 2
        names = r.kernel.arg_names
        free = not_specialized(r.kernel)
        for i in range(len(r.calls[0][0])):
            values = {args[i] for args, _ in r.calls if isinstance(args[i], int)}
            if len(values) > 1:
                assert names[i] in free, f"{name}: int argument {names[i]} takes {sorted(values)} across " \
                                         f"batches but is specialized (add it to do_not_specialize)"
    assert launched >= 4  # init, round, attention, merge


@pytest.mark.parametrize("n", range(1, 10))
def test_builder_metadata_rows_start_16_byte_aligned(n):
    """The builder ships a step's per-request int rows to the device in one copy. Triton keys compiled kernels on
    pointer alignment, so a row at an unaligned offset (n not a multiple of 4) compiled a second variant of every
    kernel mid-serving on the H200 (vLLM's jit_monitor: _hip_mask_init_kernel). Every row must start aligned."""
    import types

    from vllm_hip.backend import HipMetadataBuilder

    stub = types.SimpleNamespace(device=torch.device("cpu"))
    stub._h2d = lambda t: HipMetadataBuilder._h2d(stub, t)
    host = torch.arange(4 * n, dtype=torch.int64).view(4, n) * 7
    rows = HipMetadataBuilder._h2d_rows(stub, host)
    assert [r.data_ptr() % 16 for r in rows] == [0] * 4
    assert torch.equal(torch.stack(rows), host.to(torch.int32))


@pytest.mark.parametrize("capable", [False, True], ids=["no-pdl", "sm90"])
def test_every_launch_pairs_the_pdl_wait_with_the_pdl_launch(monkeypatch, capable):
    """A grid launched with programmatic dependent launch may start before its predecessor finishes; only the wait
    at its first instruction (constexpr ``PDL``) keeps it from reading that predecessor's output early. So every
    launch passes ``launch_pdl`` exactly when it compiles the wait in, on every kernel, and neither off sm_90 or
    under the interpreter."""
    names = KERNELS + ["_kv_write_kernel", "_kv_write_kernel_tiered"]
    rec = {name: Recorder(getattr(th, name)) for name in names}
    for name, r in rec.items():
        monkeypatch.setattr(th, name, r)
    monkeypatch.setattr(th, "_is_tiered", lambda host: host is not None)
    monkeypatch.setattr(th, "_tier_args", lambda cache, host: (0, *host.stride()))
    monkeypatch.setattr(th, "_INTERPRET", False)
    monkeypatch.setattr(th, "_pdl_capable", lambda device_type, index: capable)
    for tiered in (False, True):
        _launch_all(3, 700, tiered)
        kv = torch.randn(2, 2, 32)
        host = dict(host_k_cache=kv.clone(), host_v_cache=kv.clone()) if tiered else {}
        th.kv_write(kv, kv, torch.zeros(8, 16, 2, 32), torch.zeros(8, 16, 2, 32), torch.tensor([0, 5]), **host)
    calls = [(name, kw) for name, r in rec.items() for _, kw in r.calls]
    assert {name for name, _ in calls} >= {"_hip_mask_init_kernel", "_hip_mask_round_kernel", "_hip_attn_kernel",
                                           "_merge_kernel", "_kv_write_kernel", "_kv_write_kernel_tiered"}
    for name, kw in calls:
        assert kw["PDL"] is capable and kw.get("launch_pdl", False) is capable, (name, kw)
