"""Two-tier (device + host) paged KV addressing: every op with ``host_k_cache`` / ``host_v_cache``.

A logical cache of N pages is scattered over a device tier of G < N pages and a host tier of H pages through a
random logical -> physical page map ``loc``; block tables and slot mappings are translated with it. Every op on
the tiers must give what it gives on the logical cache: the same selections and the same attention outputs (the
same arithmetic on the same values: bit-exact in practice, checked with a tight tolerance), writes that land in
the right tier and nowhere else. Physical pages that hold no logical page are poisoned with NaN.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1) on CPU tensors and the host tier
is a plain CPU tensor. With CUDA the host tier is pinned host memory seen through a UVA view (``uva_view``), as
in KV offload; the CUDA variants skip if no such view can be made. Fresh random inputs in every test.
"""
import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

th = None
_TRITON_SKIP = "triton is not installed"
if not CUDA and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    _TRITON_SKIP = "triton was imported before TRITON_INTERPRET=1 could be set; run with TRITON_INTERPRET=1"
else:
    if not CUDA:  # must be set before triton is first imported
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        import kernels.triton_hip as th

        if th._INTERPRET != (not CUDA):  # imported earlier with the other mode: rebuild our jit functions
            th = importlib.reload(th)
    except ImportError:
        th = None
needs_triton = pytest.mark.skipif(th is None, reason=_TRITON_SKIP)

from kernels.reference import (  # noqa: E402
    dense_attention_reference,
    hip_attention_reference,
    hip_mask_reference,
    kv_write_reference,
    make_query_blocks,
    selection_cache_reference,
    tiered_cache,
    window_starts,
)
from kernels.torch_hip import hip_attention_torch  # noqa: E402

# tiered vs untiered run the same arithmetic on the same values; the bound only allows for a compiler that
# orders the two variants' float operations differently (none seen)
TIGHT = 1e-6


# ------------------------------------------------------------------------------------------- host tier
class _CudaArrayInterface:
    """``__cuda_array_interface__`` over the bytes of a contiguous pinned CPU tensor (kept alive here)."""

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.__cuda_array_interface__ = {
            "shape": (t.numel() * t.element_size(),),
            "typestr": "|u1",
            "data": (t.data_ptr(), False),
            "version": 3,
        }


def uva_view(cpu_pinned: torch.Tensor) -> torch.Tensor | None:
    """A CUDA tensor over the memory of the pinned CPU tensor ``cpu_pinned`` (no copy), or None.

    vLLM's ``get_cuda_view_from_cpu_tensor`` when vLLM is importable; else the device pointer of cudaHostAlloc'd
    memory is its host pointer (UVA), so its bytes are wrapped as a ``|u1`` CUDA array and viewed as the dtype.
    """
    assert cpu_pinned.is_pinned() and cpu_pinned.is_contiguous()
    try:
        import vllm._C  # noqa: F401  registers torch.ops._C

        return torch.ops._C.get_cuda_view_from_cpu_tensor(cpu_pinned)
    except Exception:
        pass
    try:
        raw = torch.as_tensor(_CudaArrayInterface(cpu_pinned), device="cuda")
        view = raw.view(cpu_pinned.dtype).view(cpu_pinned.shape)
        assert view.data_ptr() == cpu_pinned.data_ptr()
        return view
    except Exception:
        return None


def _host_tier(shape, dtype):
    """Host-tier storage ``(tensor the ops get, the host memory behind it)``: one CPU tensor without CUDA, else a
    UVA view of a pinned CPU tensor and that tensor."""
    if not CUDA:
        t = torch.empty(shape, dtype=dtype)
        return t, t
    pinned = torch.empty(shape, dtype=dtype, pin_memory=True)
    view = uva_view(pinned)
    if view is None:
        pytest.skip("no CUDA view of pinned host memory (neither vLLM nor __cuda_array_interface__ worked)")
    return view, pinned


# The same problems and error measure as the untiered tests: tiered runs are compared on identical inputs.
from test_kernels_triton import _problem, _rel  # noqa: E402


class Tiers:
    """The logical caches ``kc``/``vc`` scattered over a device tier (G pages, vLLM-like strided, one buffer for
    K and V) and a host tier (H pages, separate contiguous K and V: other strides) by a random page map."""

    def __init__(self, kc, vc, seed, spare=2):
        g = torch.Generator().manual_seed(seed + 1000)
        N, page, Hkv, D = kc.shape
        self.G = G = max(1, N // 3)
        self.H = H = N - G + spare
        self.loc = torch.randperm(G + H, generator=g)[:N].to(DEV)  # logical page -> physical page
        nan = float("nan")
        self.raw = torch.full((G, Hkv, page, 2 * D), nan, dtype=kc.dtype, device=DEV)
        self.k = self.raw[..., :D].permute(0, 2, 1, 3)
        self.v = self.raw[..., D:].permute(0, 2, 1, 3)
        self.hk, self.hk_mem = _host_tier((H, page, Hkv, D), kc.dtype)
        self.hv, self.hv_mem = _host_tier((H, page, Hkv, D), kc.dtype)
        self.hk.fill_(nan)
        self.hv.fill_(nan)
        on_dev = self.loc < G
        for dev_tier, host_tier, logical in ((self.k, self.hk, kc), (self.v, self.hv, vc)):
            dev_tier[self.loc[on_dev]] = logical[on_dev]
            host_tier[self.loc[~on_dev] - G] = logical[~on_dev]
        assert bool(on_dev.any()) and bool((~on_dev).any())

    def block_table(self, bt):
        return self.loc[bt.long()].to(bt.dtype)

    def slots(self, slots):
        page = self.k.shape[1]
        phys = self.loc[torch.clamp(slots.long(), min=0) // page] * page + slots.long() % page
        return torch.where(slots >= 0, phys, slots.long()).to(slots.dtype)

    @property
    def kw(self):
        return dict(host_k_cache=self.hk, host_v_cache=self.hv)


# ----------------------------------------------------------------------------- 1. Triton: tiered == untiered
TRITON_CASES = [
    # Hq, Hkv, D, page, dtype, bk, n
    (2, 2, 32, 16, torch.float32, 2, 8),  # GQA 1
    (8, 2, 32, 32, torch.bfloat16, 4, 4),  # GQA 4
    (8, 1, 32, 16, torch.bfloat16, 1, 8),  # GQA 8
    (8, 1, 64, 32, torch.float32, 2, 6),  # GQA 8
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"G{c[0]//c[1]}-D{c[2]}-p{c[3]}-{str(c[4])[6:]}-bk{c[5]}-n{c[6]}")
def test_triton_tiered_matches_untiered(case):
    Hq, Hkv, D, page, dtype, bk, n = case
    sink, window, bq = 4, 2 * bk + 7, 8
    L = n * bk
    # ragged: a chunked prefill, decodes of several lengths (split-K below), hierarchical masks of 1-3 rounds
    seq, q_lens = [5 * L + 29, 3 * L + 11, 50, 7 * L + 3], [bq + 5, 1, 1, 1]
    q, kc, vc, bt, qsl, seql = _problem(seq, q_lens, Hq, Hkv, D, page, dtype, seed=Hq * D + bk)
    tiers = Tiers(kc, vc, seed=page + n)
    pbt = tiers.block_table(bt)
    qb = make_query_blocks(qsl, seql, bq)
    ws = window_starts(qb[3], window, bk)

    # hip_mask, both variants, raw and normalised score (whose sink/window keys are read from both tiers too):
    # identical selections
    mk = dict(n_select=n, block_size_q=bq, block_size_k=bk, sink_tokens=sink, query_stride=2)
    for norm in (window, 0):
        for single in (False, True):
            ref = th.hip_mask(q, kc, bt, *qb[:3], ws, single_launch=single, norm_window=norm, **mk)
            got = torch.full_like(ref, -5)
            th.hip_mask(q, tiers.k, pbt, *qb[:3], ws, out=got, single_launch=single, host_k_cache=tiers.hk,
                        norm_window=norm, **mk)
            assert torch.equal(got, ref), f"single_launch={single}, norm_window={norm}"
    idx = ref

    # hip_attention: the whole batch (prefill tiles), then the decode blocks alone with split-K
    ak = dict(sink_tokens=sink, block_size_k=bk, scale=D ** -0.5)
    ref = th.hip_attention(q, kc, vc, bt, seql, *qb, ws, idx, num_splits=1, block_size_q=bq, **ak)
    got = torch.full_like(q, float("nan"))
    th.hip_attention(q, tiers.k, tiers.v, pbt, seql, *qb, ws, idx, out=got, num_splits=1, block_size_q=bq,
                     **tiers.kw, **ak)
    assert _rel(got, ref) <= TIGHT
    dec = qb[2] == 1
    rows = qb[1][dec].long()
    part = [t[dec] for t in qb]
    ref = torch.full_like(q, float("nan"))
    th.hip_attention(q, kc, vc, bt, seql, *part, ws[dec], idx[dec], out=ref, num_splits=3, block_size_q=1, **ak)
    got = torch.full_like(q, float("nan"))
    th.hip_attention(q, tiers.k, tiers.v, pbt, seql, *part, ws[dec], idx[dec], out=got, num_splits=3,
                     block_size_q=1, **tiers.kw, **ak)
    assert _rel(got[rows], ref[rows]) <= TIGHT
    assert torch.isnan(got[qb[1][~dec].long()]).all()  # the prefill rows were not this launch's


@needs_triton
def test_triton_dense_attention_tiered():
    Hq, Hkv, D, page, dtype = 4, 2, 32, 16, torch.bfloat16
    q, kc, vc, bt, qsl, seql = _problem([77, 130, 33], [20, 1, 1], Hq, Hkv, D, page, dtype, seed=41)
    tiers = Tiers(kc, vc, seed=41)
    ref = th.dense_attention(q, kc, vc, bt, seql, qsl, scale=D ** -0.5, block_size_q=16)
    got = th.dense_attention(q, tiers.k, tiers.v, tiers.block_table(bt), seql, qsl, scale=D ** -0.5,
                             block_size_q=16, **tiers.kw)
    assert _rel(got, ref) <= TIGHT


# ------------------------------------------------------------------------------------- 2. kv_write in tiers
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype,page", [(torch.float32, 16), (torch.bfloat16, 32)])
def test_kv_write_into_tiers(impl, dtype, page):
    if impl == "triton" and th is None:
        pytest.skip(_TRITON_SKIP)
    write = th.kv_write if impl == "triton" else kv_write_reference
    g = torch.Generator().manual_seed(page)
    Hkv, D, G, H, T = 2, 32, 3, 4, 41
    raw = torch.randn(G, Hkv, page, 2 * D, generator=g).to(dtype).to(DEV)
    kc, vc = raw[..., :D].permute(0, 2, 1, 3), raw[..., D:].permute(0, 2, 1, 3)
    hk, hk_mem = _host_tier((H, page, Hkv, D), dtype)
    hv, hv_mem = _host_tier((H, page, Hkv, D), dtype)
    hk.copy_(torch.randn(H, page, Hkv, D, generator=g).to(dtype))
    hv.copy_(torch.randn(H, page, Hkv, D, generator=g).to(dtype))
    key = torch.randn(T, Hkv, D, generator=g).to(DEV)  # fp32 in, cast on write
    value = torch.randn(T, 2 * Hkv, D, generator=g).to(DEV)[:, ::2]  # strided input
    slots = torch.randperm((G + H) * page, generator=g)[:T]
    slots[::5] = -1
    assert bool((slots >= G * page).any()) and bool(((slots >= 0) & (slots < G * page)).any())
    # expected: one row at a time into the tier its page lives in
    raw_exp, hk_exp, hv_exp = raw.clone(), hk.clone(), hv.clone()
    kc_exp, vc_exp = raw_exp[..., :D].permute(0, 2, 1, 3), raw_exp[..., D:].permute(0, 2, 1, 3)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        p, o = divmod(s, page)
        kt, vt = (kc_exp, vc_exp) if p < G else (hk_exp, hv_exp)
        kt[p if p < G else p - G, o] = key[t].to(dtype)
        vt[p if p < G else p - G, o] = value[t].to(dtype)
    write(key, value, kc, vc, slots.to(DEV), host_k_cache=hk, host_v_cache=hv)
    assert torch.equal(raw, raw_exp)  # the device buffer, the bytes between its K and V views included
    assert torch.equal(hk, hk_exp) and torch.equal(hv, hv_exp)
    if CUDA:  # the writes reached host memory
        torch.cuda.synchronize()
        assert torch.equal(hk_mem, hk_exp.cpu()) and torch.equal(hv_mem, hv_exp.cpu())


@needs_triton
def test_kv_write_tiered_matches_untiered():
    """The same rows written to the logical cache and, through ``loc``, to the tiers leave them in step."""
    Hkv, D, page, dtype = 2, 32, 16, torch.bfloat16
    q, kc, vc, bt, qsl, seql = _problem([40, 70], [1, 1], 2, Hkv, D, page, dtype, seed=3)
    tiers = Tiers(kc, vc, seed=3)
    g = torch.Generator().manual_seed(4)
    N, T = kc.shape[0], 30
    key, value = torch.randn(T, Hkv, D, generator=g).to(DEV), torch.randn(T, Hkv, D, generator=g).to(DEV)
    slots = torch.randperm(N * page, generator=g)[:T].to(DEV)
    slots[::7] = -1
    th.kv_write(key, value, kc, vc, slots)
    th.kv_write(key, value, tiers.k, tiers.v, tiers.slots(slots), **tiers.kw)
    virt_k, virt_v = tiered_cache(tiers.k, tiers.hk), tiered_cache(tiers.v, tiers.hv)
    assert torch.equal(virt_k[tiers.loc], kc) and torch.equal(virt_v[tiers.loc], vc)


# ------------------------------------------------------- 2b. the selection cache: decode reads no host page
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selection_cache_keeps_staged_decode_off_the_host_tier(dtype):
    """KV offload's selection cache (``hip_mask(cand=...)``, ``hip_attention(cand=...)``): a whole search fills it
    with its exact round's candidate keys and values; exact-only refreshes and attention then read selected blocks
    there. Decode steps on the tiers with the cache give the selections and outputs of the untiered kernels, the
    cache holds what the reference gather says, and once it is filled the pages between the sink and the window
    are poisoned (NaN) in both tiers: exact-only refreshes and attention still match, so they read none of them.
    Rows: searches that halve 4 times, once, never (exact round at once), and one that takes all blocks."""
    Hq, Hkv, D, page, bk, n, sink, window, E = 8, 2, 32, 16, 4, 8, 8, 32, 4
    lens = [40 * n * bk + 7, 7 * n * bk + 16, 3 * n * bk, 20, 25 * n * bk + 3]
    q, kc, vc, bt, qsl, seq = _problem(lens, [1] * len(lens), Hq, Hkv, D, page, dtype, seed=41)
    tiers = Tiers(kc, vc, seed=41)
    pbt = tiers.block_table(bt)
    qb = make_query_blocks(qsl, seq, 1)
    ws = window_starts(qb[3], window, bk)
    rows = torch.tensor([3, 0, 5, 1, 4], dtype=torch.int32, device=DEV)
    mk = dict(n_select=n, block_size_q=1, block_size_k=bk, sink_tokens=sink, query_stride=1, exact_blocks=E,
              norm_window=16)
    ak = dict(sink_tokens=sink, block_size_k=bk, scale=D ** -0.5, block_size_q=1, num_splits=2)

    def buffers():
        return (torch.full((6, Hkv, n), -1, dtype=torch.int32, device=DEV),
                tuple(torch.full((6, Hkv, n), -3, dtype=torch.int32, device=DEV) for _ in range(2)))

    (ref_idx, ref_groups), (idx, groups) = buffers(), buffers()
    C = n * E * bk
    ck = torch.full((6, Hkv, C, D), float("nan"), dtype=dtype, device=DEV)
    cv = torch.full_like(ck, float("nan"))
    pick = torch.full_like(idx, -7)
    cand = (ck, cv, pick)
    g = torch.Generator().manual_seed(42)
    steps = [([1, 1, 1, 1, 1], [1, 1, 1, 1, 1]), ([1, 1, 1, 1, 1], [0, 0, 0, 0, 0]),
             ([1, 0, 1, 1, 1], [0, 0, 0, 0, 0]), ([0, 1, 1, 0, 1], [0, 0, 0, 0, 0])]
    for step, (active, coarse) in enumerate(steps):
        if step:
            q = q + 0.5 * torch.randn(q.shape, generator=g).to(q)
        a = torch.tensor(active, dtype=torch.int32, device=DEV)
        c = torch.tensor(coarse, dtype=torch.bool, device=DEV)
        th.hip_mask(q, kc, bt, *qb[:3], ws, out=ref_idx, out_row=rows, active=a, groups=ref_groups, coarse=c, **mk)
        th.hip_mask(q, tiers.k, pbt, *qb[:3], ws, out=idx, out_row=rows, active=a, groups=groups, coarse=c,
                    host_k_cache=tiers.hk, cand=cand, v_cache=tiers.v, host_v_cache=tiers.hv, **mk)
        assert torch.equal(idx, ref_idx), step
        want = th.hip_attention(q, kc, vc, bt, seq, *qb, ws, ref_idx, indices_row=rows, **ak)
        got = torch.full_like(q, float("nan"))
        th.hip_attention(q, tiers.k, tiers.v, pbt, seq, *qb, ws, idx, indices_row=rows, out=got, cand=cand,
                         exact_blocks=E, **tiers.kw, **ak)
        assert _rel(got, want) <= TIGHT, step
        if step == 0:
            # the cache holds each row's candidates (the take-all row, 20 tokens, has none) ...
            for i, r in enumerate(rows.long().tolist()):
                if i == 3:
                    continue
                for cache, logical in ((ck, kc), (cv, vc)):
                    rows_want, valid = selection_cache_reference(logical, bt, i, groups[0][r], groups[1][r],
                                                                 n_select=n, exact_blocks=E, block_size_k=bk)
                    assert valid.any() and torch.equal(cache[r][valid], rows_want[valid]), (i, r)
                sel = idx[r]  # ... and each kept block's candidate index points at that block
                ci = pick[r].long()
                assert torch.equal(groups[0][r].gather(1, ci // E) + ci % E, sel.long()), (i, r)
            # ... so the pages between the sink and the windows are read no more: poison them in both tiers
            nan = float("nan")
            for i in range(len(lens)):
                for p in range(-(-sink // page), int(ws[i]) // page):
                    phys = int(pbt[i, p])
                    for dev_t, host_t in ((tiers.k, tiers.hk), (tiers.v, tiers.hv)):
                        (dev_t[phys] if phys < tiers.G else host_t[phys - tiers.G]).fill_(nan)


# ------------------------------------------------------------------- 3. reference and torch: tiered == untiered
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa,page,bk", [(1, 16, 2), (4, 32, 4), (8, 16, 1)])
def test_reference_and_torch_tiered_match_untiered(dtype, gqa, page, bk):
    Hkv, D, n, bq, sink = 2, 32, 6, 16, 2 * bk
    seq, q_lens = [37, 300, 513, 90, 129], [1, 120, 77, 1, 129]  # decodes, chunked prefill, fresh prefill
    q, kc, vc, bt, qsl, seql = _problem(seq, q_lens, Hkv * gqa, Hkv, D, page, dtype, seed=gqa * page + bk)
    tiers = Tiers(kc, vc, seed=bk)
    pbt = tiers.block_table(bt)
    qb = make_query_blocks(qsl, seql, bq)
    ws = window_starts(qb[3], 40, bk)
    ws[1] = 0  # one dense block among sparse ones
    mk = dict(n_select=n, block_size_q=bq, block_size_k=bk, sink_tokens=sink, query_stride=2)
    idx = hip_mask_reference(q, kc, bt, *qb[:3], ws, **mk)
    assert torch.equal(hip_mask_reference(q, tiers.k, pbt, *qb[:3], ws, host_k_cache=tiers.hk, **mk), idx)
    nidx = hip_mask_reference(q, kc, bt, *qb[:3], ws, norm_window=40, **mk)
    assert torch.equal(hip_mask_reference(q, tiers.k, pbt, *qb[:3], ws, host_k_cache=tiers.hk, norm_window=40,
                                          **mk), nidx)
    ak = dict(sink_tokens=sink, block_size_k=bk, scale=0.3)
    ref = hip_attention_reference(q, kc, vc, bt, seql, *qb, ws, idx, **ak)
    got = hip_attention_reference(q, tiers.k, tiers.v, pbt, seql, *qb, ws, idx, **tiers.kw, **ak)
    assert _rel(got, ref) <= TIGHT
    ref_d = dense_attention_reference(q, kc, vc, bt, seql, qsl, scale=0.3, block_size_q=bq)
    got_d = dense_attention_reference(q, tiers.k, tiers.v, pbt, seql, qsl, scale=0.3, block_size_q=bq, **tiers.kw)
    assert _rel(got_d, ref_d) <= TIGHT
    ref_t = hip_attention_torch(q, kc, vc, bt, seql, *qb, ws, idx, max_keys_per_chunk=4096, **ak)
    got_t = torch.full_like(q, float("nan"))
    hip_attention_torch(q, tiers.k, tiers.v, pbt, seql, *qb, ws, idx, out=got_t, max_keys_per_chunk=4096,
                        **tiers.kw, **ak)  # small chunks: exercise the chunking
    assert _rel(got_t, ref_t) <= TIGHT
