"""The start-up warm-up (ops.compile_kernels) launches every Triton kernel variant a HiP layer uses, so that no
serving step compiles one (vLLM's jit_monitor caught _hip_mask_kernel / _hip_attn_kernel compiling mid-run on the
H200). Runs the warm-up for real (Triton interpreter on CPU) and records which kernels and constexpr variants it
launched."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
pytest.importorskip("vllm")

from vllm_hip import ops  # noqa: E402
from vllm_hip.config import HipConfig  # noqa: E402


class Spy:
    def __init__(self, kernel, seen, name):
        self.kernel, self.seen, self.name = kernel, seen, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.seen.add((self.name, tuple(sorted((k, v) for k, v in kw.items() if k in ("SPLIT", "QR", "HAS_ACTIVE", "GROUPS", "CAND")))))
            return launch(*args, **kw)
        return run


def test_warm_up_launches_every_variant(monkeypatch):
    th = ops._triton()
    seen = set()
    for name in ("_hip_mask_kernel", "_hip_mask_init_kernel", "_hip_mask_round_kernel", "_hip_attn_kernel",
                 "_merge_kernel", "_kv_write_kernel"):
        monkeypatch.setattr(th, name, Spy(getattr(th, name), seen, name))
    cfg = HipConfig.from_dict({"k": 64, "block_size_k": 4, "block_size_q": 16, "sink_tokens": 8, "sliding_window": 32})
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops.compile_kernels(dev, torch.float32, num_heads=8, num_kv_heads=2, head_size=32, page_size=16,
                        block_table_width=40, cfg=cfg)
    names = {n for n, _ in seen}
    assert names == {"_hip_mask_kernel", "_hip_mask_init_kernel", "_hip_mask_round_kernel", "_hip_attn_kernel",
                     "_merge_kernel", "_kv_write_kernel"}, names
    attn = {dict(v)["QR"] > 1: set() for n, v in seen if n == "_hip_attn_kernel"}
    for n, v in seen:
        if n == "_hip_attn_kernel":
            attn[dict(v)["QR"] > 1].add(dict(v)["SPLIT"])
    assert attn == {True: {True, False}, False: {True, False}}, attn  # prefill and decode tiles, split or not
    for kernel in ("_hip_mask_kernel", "_hip_mask_round_kernel"):  # prefill (no refresh flags) and decode
        assert {dict(v)["HAS_ACTIVE"] for n, v in seen if n == kernel} == {True, False}, kernel


def test_warm_up_with_the_staged_refresh_launches_its_variant(monkeypatch):
    """``hip.mask_coarse_interval``: decode masks run the per-round kernels with the group caches (GROUPS), a
    variant the plain warm-up never launches; without it, no GROUPS variant is compiled."""
    th = ops._triton()
    for coarse, want in ((0, {False}), (8, {False, True})):
        seen = set()
        for name in ("_hip_mask_init_kernel", "_hip_mask_round_kernel"):
            monkeypatch.setattr(th, name, Spy(getattr(th, name).kernel if isinstance(getattr(th, name), Spy)
                                              else getattr(th, name), seen, name))
        cfg = HipConfig.from_dict({"k": 64, "block_size_k": 4, "block_size_q": 16, "sink_tokens": 8,
                                   "sliding_window": 32, "mask_refresh_interval": 4, "mask_coarse_interval": coarse})
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ops.compile_kernels(dev, torch.float32, num_heads=8, num_kv_heads=2, head_size=32, page_size=16,
                            block_table_width=40, cfg=cfg)
        for kernel in ("_hip_mask_init_kernel", "_hip_mask_round_kernel"):
            assert {dict(v).get("GROUPS") for n, v in seen if n == kernel} == want, (coarse, kernel, seen)


def test_warm_up_with_offload_launches_the_two_tier_variants(monkeypatch):
    """With KV offload the HiP layers launch the ``*_tiered`` kernels and the page swap; on the H200 they compiled
    at first use, inside serving steps (jit_monitor). The warm-up must launch them too, with a host tier."""
    import vllm_hip.kernels.page_swap as ps

    th = ops._triton()
    seen = set()
    tiered = ("_hip_mask_kernel_tiered", "_hip_mask_init_kernel_tiered", "_hip_mask_round_kernel_tiered",
              "_hip_attn_kernel_tiered", "_kv_write_kernel_tiered")
    for name in tiered:
        monkeypatch.setattr(th, name, Spy(getattr(th, name), seen, name))
    monkeypatch.setattr(ps, "_swap_pages_kernel", Spy(ps._swap_pages_kernel, seen, "_swap_pages_kernel"))
    cfg = HipConfig.from_dict({"k": 64, "block_size_k": 4, "block_size_q": 16, "sink_tokens": 8, "sliding_window": 32,
                               "offload": {"gpu_blocks": 8, "host_gib": 0.01}})
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops.compile_kernels(dev, torch.float32, num_heads=8, num_kv_heads=2, head_size=32, page_size=16,
                        block_table_width=40, cfg=cfg, host_tier=True)
    assert {n for n, _ in seen} == {*tiered, "_swap_pages_kernel"}, seen
    assert {dict(v)["SPLIT"] for n, v in seen if n == "_hip_attn_kernel_tiered"} == {True, False}
    # the selection cache's variants (hip.offload.selection_cache_gib > 0): staged mask and decode attention
    for kernel in ("_hip_mask_round_kernel_tiered", "_hip_attn_kernel_tiered"):
        assert {dict(v)["CAND"] for n, v in seen if n == kernel} == {True, False}, kernel


def test_warm_up_keys_cover_launches_on_the_offload_managers_tiers(monkeypatch):
    """The warm-up's two-tier launches carry the same Triton compile keys (tests/kernel_keys.py: constexprs,
    options, pointer alignment, int specialization) as launches on the tiers ``HostTiers`` really builds around a
    vLLM-layout KV tensor, with metadata shaped as the builder ships it: nothing compiles at the first offloaded
    step (on the H200 three two-tier kernels did, before they were in the warm-up)."""
    import kernel_keys

    from vllm_hip.kernels.reference import window_starts
    from vllm_hip.kv_offload import HostTiers

    log: list = []
    th = ops._triton()
    kernel_keys.install(log, monkeypatch.setattr)  # the module objects ops launches through
    Hkv, Hq, hs, page, G, width = 2, 8, 32, 16, 40, 40
    cfg = HipConfig.from_dict({"k": 64, "block_size_k": 4, "block_size_q": 16, "sink_tokens": 8, "sliding_window": 32,
                               "offload": {"host_gib": 60 * Hkv * page * 2 * hs * 4 / 2**30, "max_moves": 4}})
    # the device the warm-up really runs on: the interpreter on CPU, the GPU where there is one
    dev_t = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops.compile_kernels(dev_t, torch.float32, num_heads=Hq, num_kv_heads=Hkv, head_size=hs,
                        page_size=page, block_table_width=width, cfg=cfg, host_tier=True)
    start = len(log)
    dev = torch.zeros(G, page, Hkv, 2 * hs, device=dev_t).transpose(1, 2)  # vLLM's per-layer tensor, logical view
    tiers = HostTiers(cfg, {"model.layers.5.attn": dev}, page, dev_t, write_moves=8)
    tiers.host_kv["model.layers.5.attn"].zero_()  # allocated empty: garbage would overflow the interpreter's matmul
    hk, hv = tiers.host_kv["model.layers.5.attn"].transpose(1, 2).split(hs, -1)
    dk, dv = dev.transpose(1, 2).split(hs, -1)
    g = torch.Generator().manual_seed(0)
    n_pages = G + tiers.residency.num_host_pages
    bt = torch.randint(0, n_pages, (3, width), generator=g, dtype=torch.int32).to(dev_t)
    ctx = [600, 410, 300]
    seq = torch.tensor(ctx, dtype=torch.int32, device=dev_t)
    # three decode rows as the builder ships them (its persistent, aligned buffers sliced from the start)
    buf = {k: torch.zeros(8, dtype=torch.int32, device=dev_t) for k in ("req", "start", "len", "pos0", "row")}
    for k, v in (("req", [0, 1, 2]), ("start", [0, 1, 2]), ("len", [1, 1, 1]), ("pos0", [c - 1 for c in ctx]),
                 ("row", [0, 1, 2])):
        buf[k][:3] = torch.tensor(v, device=dev_t)
    req, st, ln, pos0, row = (buf[k][:3] for k in ("req", "start", "len", "pos0", "row"))
    ws = window_starts(pos0, cfg.sliding_window, cfg.block_size_k)
    q = torch.randn(3, Hq, hs, generator=g).to(dev_t)
    cache = torch.full((4, Hkv, cfg.n_select), -1, dtype=torch.int32, device=dev_t)
    refresh = torch.ones(8, dtype=torch.bool, device=dev_t)[:3]
    mk = dict(cfg.mask_kwargs, host_k_cache=hk)  # as the HiP layers pass them
    for single in (True, False):
        th.hip_mask(q, dk, bt, req, st, ln, ws, out=cache, out_row=row, active=refresh, single_launch=single, **mk)
    th.hip_attention(q, dk, dv, bt, seq, req, st, ln, pos0, ws, cache, indices_row=row, out=torch.empty_like(q),
                     sink_tokens=cfg.sink_tokens, block_size_k=cfg.block_size_k, scale=hs ** -0.5,
                     host_k_cache=hk, host_v_cache=hv)
    # the staged refresh with the selection cache, allocated as the builder allocates it
    from vllm_hip.kernels.reference import mask_group_width
    from vllm_hip.kv_offload import alloc_selection_cache

    stack = torch.full((2, 4, Hkv, cfg.n_select), -1, dtype=torch.int32, device=dev_t)  # the builder's mask stack
    cache = stack[1]
    cand = alloc_selection_cache(cfg, 3, Hkv, hs, dk.dtype, dev_t, cache)
    cand[0].zero_(), cand[1].zero_()
    width = mask_group_width(cfg.n_select)
    g2 = torch.zeros((2, 2, 4, Hkv, width), dtype=torch.int32, device=dev_t)
    coarse = torch.ones(8, dtype=torch.bool, device=dev_t)[:3]
    th.hip_mask(q, dk, bt, req, st, ln, ws, out=cache, out_row=row, active=refresh, groups=(g2[0, 1], g2[1, 1]),
                coarse=coarse, cand=cand, v_cache=dv, host_v_cache=hv, **mk)
    th.hip_attention(q, dk, dv, bt, seq, req, st, ln, pos0, ws, cache, indices_row=row, out=torch.empty_like(q),
                     sink_tokens=cfg.sink_tokens, block_size_k=cfg.block_size_k, scale=hs ** -0.5,
                     host_k_cache=hk, host_v_cache=hv, cand=cand, exact_blocks=cfg.mask_exact_blocks)
    slots = torch.tensor([5 * page + 3, (G + 7) * page + 1, -1], device=dev_t)  # int64, as vLLM's slot mapping
    th.kv_write(torch.randn(3, Hkv, hs, generator=g).to(dev_t), torch.randn(3, Hkv, hs, generator=g).to(dev_t),
                dk, dv, slots, host_k_cache=hk, host_v_cache=hv)
    tiers.residency.advance()
    tiers.residency.touch_slots(slots, page)
    assert len(log) > start
    assert kernel_keys.new_variants(log, start) == []
