"""Triton kernels of HiP attention over vLLM's paged KV cache.

Same conventions as ``kernels/reference.py`` (read its module docstring): paged caches
``[num_blocks, page_size, Hkv, D]`` (any strides), ragged batches cut into query blocks, logical key blocks of
``block_size_k`` positions independent of the page size, window start per query block, selection per KV-head
group. Imports torch and triton only.

Ops:

* ``kv_write``: scatter new K/V rows into their cache slots (slot < 0 skipped).
* ``hip_mask``: hierarchical top-k key-block selection (HiP v3), one program per (query block, KV head), all
  rounds inside one launch (no host sync, CUDA-graph capturable).
* ``hip_attention``: block-sparse FlashAttention over sink + selected blocks + sliding window, one KV load per
  KV-head group (the G query heads x query rows share the M dimension of ``tl.dot``), with a split-K path and a
  log-sum-exp merge for small grids (decode).

Two-tier (KV offload) mode: every op takes ``host_k_cache`` / ``host_v_cache`` (default None; ``hip_mask`` only
the K one). Block tables and slot mappings then hold physical page ids in ``[0, G + H)`` with
``G = k_cache.shape[0]``: page ``p < G`` is ``k_cache[p]``, page ``p >= G`` is ``host_k_cache[p - G]`` (its own
strides). On CUDA the host tier is pinned host memory mapped into the GPU's address space (a UVA view: a CUDA
tensor), read and written in place. Each op then launches a ``*_tiered`` kernel: the same ``@triton.jit`` body
with the constexpr ``TIERED`` set, which picks the tier per cache row. Without a host tier the original kernels
run, with their original arguments: same compiled code, same launch cost.

KV offload's selection cache (``hip_mask(cand=...)``, ``hip_attention(cand=...)``, two-tier staged decode only): a
whole search's exact round also copies its candidates' keys and values into a per-(mask row, KV head) GPU buffer;
the exact-only refreshes score those keys and the attention reads selected blocks there, so decode between whole
searches reads no host memory. Same values, same order: the same selections and outputs.

On sm_90 and newer every kernel is launched with programmatic dependent launch (``_pdl``): the next grid of the
stream starts launching while the current one runs, and each kernel's first instruction waits for its predecessor
to finish (``_gdc_enter``), so results are those of plain stream order. That hides part of the launch latency of
a HiP layer's chain of small (in decode steps without refreshes: empty) launches.

Everything runs under ``TRITON_INTERPRET=1`` on CPU tensors as well (the tests do that; PDL is off there).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .reference import mask_group_width, search_schedule

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Launch values that change with the batch (request count, query blocks, refinement round, split count) are
# runtime arguments that Triton does not specialize on (``do_not_specialize``), never constexprs: one compiled
# kernel serves every batch, so a batch of a new size never stalls a serving step on a JIT compile (vLLM's
# jit_monitor flagged exactly that on the H200: _hip_mask_kernel / _hip_attn_kernel compiled mid-run).
# The host tier's offset from the device cache (``hk_off``/``hv_off``) is an address difference: its width and
# divisibility depend on where the allocator put two tensors, so the tiered kernels take it as an unspecialized
# ``tl.int64`` (on the H200 the warm-up's tiny host tier and the offload manager's differed, and the first
# offloaded step compiled a fourth variant).
MAX_SPLITS = 32  # split-K bound for decode; also the merge kernel's fixed tile


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jit function: slower to call from Python


def _p2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_type: str, index: int | None) -> bool:
    return device_type == "cuda" and torch.cuda.get_device_capability(index)[0] >= 9


def _pdl(device: torch.device, pdl: bool | None = None) -> dict:
    """Launch options for programmatic dependent launch: on where the GPU has it (sm_90 and newer) unless ``pdl``
    is False (a benchmark knob); never under the interpreter.

    A HiP layer is a chain of small launches (KV write, the mask's init and round launches, attention, merge), most
    of them short or, in a decode step without refreshes, empty. With PDL the GPU starts launching the next grid of
    the chain while the current one runs; every kernel then waits at its first instruction until the previous grid
    has finished and its writes are visible (``_gdc_enter``), so the result is that of plain stream order."""
    on = pdl is not False and not _INTERPRET and _pdl_capable(device.type, device.index)
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


@triton.jit
def _gdc_enter(PDL: tl.constexpr):
    """First statement of every kernel: with PDL, wait until the previous grid of the stream has completed and
    flushed (before any load, so no kernel reads a predecessor's output early, and grids complete in stream order),
    then let the next grid of the stream begin launching."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with an fp32 accumulator. IEEE: exact fp32 products (fp32 inputs). UPCAST: the interpreter's bf16
    dot is broken (triton 3.9), so operands are widened to fp32 there (same values, exact products)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ------------------------------------------------------------------------------------- two-tier addressing
@triton.jit
def _tiered_rows(ptr, phys, off, h, d, s0, s1, s2, s3, host_off, hs0, hs1, hs2, hs3, n_dev):
    """Pointers ``[len(phys), len(d)]`` to elements ``(phys, off, h, d)`` of a two-tier paged cache at ``ptr``.

    A page ``phys >= n_dev`` is page ``phys - n_dev`` of the host tier, which starts ``host_off`` elements after
    ``ptr`` and has strides ``hs*``. The tier is picked per row, as an int64 element offset from the one base
    pointer: selecting between two pointer tiles instead doubled the attention kernel's spills on H200 (46 vs 20)
    and cost 5% more time. The untiered kernels keep their original inline address expression (even calling this
    with the device tier only reordered the PTX enough to cost 2% in the mask kernel).
    """
    on_dev = phys < n_dev
    row = tl.where(on_dev, phys * s0 + off * s1 + h * s2, host_off + (phys - n_dev) * hs0 + off * hs1 + h * hs2)
    col = tl.where(on_dev[:, None], d[None, :] * s3, d[None, :] * hs3)  # one tile when s3 == hs3 == 1
    return ptr + row[:, None] + col


def _is_tiered(host_cache) -> bool:
    return host_cache is not None and host_cache.shape[0] > 0


def _tier_args(cache, host_cache):
    """Arguments of a ``*_tiered`` kernel for one cache: the host tier's offset from ``cache`` in elements (the
    kernels address both tiers from ``cache``'s pointer) and its four strides."""
    assert host_cache.dtype == cache.dtype and tuple(host_cache.shape[1:]) == tuple(cache.shape[1:]), \
        "host tier must have the device tier's dtype and page shape"
    assert host_cache.device.type == cache.device.type, \
        "host tier must be on the device tier's device type (on CUDA: a UVA view of pinned host memory)"
    delta = host_cache.data_ptr() - cache.data_ptr()
    assert delta % cache.element_size() == 0, "host tier not aligned to the element size"
    return (delta // cache.element_size(), *host_cache.stride())


def _check_cand(cand, k_cache, v_cache, rows: int, idx) -> None:
    ck, cv, pick = cand
    assert ck.dtype == k_cache.dtype and cv.dtype == v_cache.dtype, "selection cache must have the KV cache's dtype"
    assert ck.shape[:3] == cv.shape[:3] and ck.shape[1] == k_cache.shape[2] and ck.shape[2] == rows, \
        f"selection cache must be [R, Hkv, {rows}, D]"
    assert ck.shape[3] == k_cache.shape[3] and cv.shape[3] == v_cache.shape[3], "selection cache head sizes"
    assert ck.stride(3) == 1 and cv.stride(3) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, \
        "selection cache and KV cache need unit head-dim strides"
    assert pick.dtype == torch.int32 and pick.shape == idx.shape and pick.stride() == idx.stride(), \
        "pick must be int32 with the mask cache's shape and strides"
    assert ck.device == k_cache.device and cv.device == k_cache.device, "selection cache on the KV cache's device"


def _rel_offset(t, base) -> int:
    """``t``'s start as an element offset from ``base``'s (the kernels address both from ``base``'s pointer)."""
    delta = t.data_ptr() - base.data_ptr()
    assert delta % base.element_size() == 0, "selection cache not aligned to the element size"
    return delta // base.element_size()


def _cand_mask_args(cand, k_cache, v_cache, host_v_cache, out, rows: int):
    """The two-tier round kernel's V-cache and selection-cache arguments (dummies without ``cand``)."""
    if cand is None:
        return (k_cache, 0, 0, 0, 0, 0, 0, 0, 0, 0, k_cache, k_cache, out, 0, 0, 0, 0, 0, 0)
    assert v_cache is not None and _is_tiered(host_v_cache), "the selection cache needs v_cache and host_v_cache"
    _check_cand(cand, k_cache, v_cache, rows, out)
    ck, cv, pick = cand
    return (v_cache, *v_cache.stride(), *_tier_args(v_cache, host_v_cache), ck, cv, pick, *ck.stride()[:3],
            *cv.stride()[:3])


# ----------------------------------------------------------------------------------------------- KV write
@triton.jit
def _kv_write_body(
    key_ptr, value_ptr, kc_ptr, vc_ptr, slot_ptr,
    sk0, sk1, sk2, sv0, sv1, sv2,
    skc0, skc1, skc2, skc3, svc0, svc1, svc2, svc3,
    page_size,
    hk_off, shk0, shk1, shk2, shk3, hv_off, shv0, shv1, shv2, shv3, n_dev,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, TIERED: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    s = tl.maximum(slot, 0)
    blk = s // page_size
    off = s % page_size
    d = tl.arange(0, BD)
    ok = (tl.zeros([BD], tl.int64) + slot) >= 0
    kx = tl.load(key_ptr + t * sk0 + h * sk1 + d * sk2, mask=d < D)
    kdst = kc_ptr + blk * skc0 + off * skc1 + h * skc2 + d * skc3
    if TIERED:
        kdst = tl.where(blk < n_dev, kdst, kc_ptr + hk_off + (blk - n_dev) * shk0 + off * shk1 + h * shk2 + d * shk3)
    tl.store(kdst, kx.to(kc_ptr.dtype.element_ty), mask=(d < D) & ok)
    dv = tl.arange(0, BDV)
    okv = (tl.zeros([BDV], tl.int64) + slot) >= 0
    vx = tl.load(value_ptr + t * sv0 + h * sv1 + dv * sv2, mask=dv < DV)
    vdst = vc_ptr + blk * svc0 + off * svc1 + h * svc2 + dv * svc3
    if TIERED:
        vdst = tl.where(blk < n_dev, vdst, vc_ptr + hv_off + (blk - n_dev) * shv0 + off * shv1 + h * shv2 + dv * shv3)
    tl.store(vdst, vx.to(vc_ptr.dtype.element_ty), mask=(dv < DV) & okv)


@triton.jit
def _kv_write_kernel(
    key_ptr, value_ptr, kc_ptr, vc_ptr, slot_ptr,
    sk0, sk1, sk2, sv0, sv1, sv2,
    skc0, skc1, skc2, skc3, svc0, svc1, svc2, svc3,
    page_size,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PDL: tl.constexpr,
):
    _gdc_enter(PDL)
    _kv_write_body(key_ptr, value_ptr, kc_ptr, vc_ptr, slot_ptr, sk0, sk1, sk2, sv0, sv1, sv2,
                   skc0, skc1, skc2, skc3, svc0, svc1, svc2, svc3, page_size,
                   0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                   D=D, DV=DV, BD=BD, BDV=BDV, TIERED=False)


@triton.jit(do_not_specialize=["n_dev", "hk_off", "hv_off"])
def _kv_write_kernel_tiered(
    key_ptr, value_ptr, kc_ptr, vc_ptr, slot_ptr,
    sk0, sk1, sk2, sv0, sv1, sv2,
    skc0, skc1, skc2, skc3, svc0, svc1, svc2, svc3,
    page_size,
    hk_off: tl.int64, shk0, shk1, shk2, shk3, hv_off: tl.int64, shv0, shv1, shv2, shv3, n_dev,
    D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PDL: tl.constexpr,
):
    _gdc_enter(PDL)
    _kv_write_body(key_ptr, value_ptr, kc_ptr, vc_ptr, slot_ptr, sk0, sk1, sk2, sv0, sv1, sv2,
                   skc0, skc1, skc2, skc3, svc0, svc1, svc2, svc3, page_size,
                   hk_off, shk0, shk1, shk2, shk3, hv_off, shv0, shv1, shv2, shv3, n_dev,
                   D=D, DV=DV, BD=BD, BDV=BDV, TIERED=True)


def kv_write(key, value, k_cache, v_cache, slot_mapping, *, host_k_cache=None, host_v_cache=None,
             pdl: bool | None = None):
    """Write ``key``/``value`` ``[T, H, D]`` into ``k_cache``/``v_cache`` at ``slot_mapping`` (< 0: skipped).

    With ``host_k_cache``/``host_v_cache`` (both or neither), slots of pages ``>= k_cache.shape[0]`` are written
    to the host tier (module docstring). ``pdl``: programmatic dependent launch (``_pdl``; default: sm_90+)."""
    assert (host_k_cache is None) == (host_v_cache is None), "pass both host tiers or neither"
    T, H, D = key.shape
    DV = value.shape[-1]
    if T == 0:
        return
    if key.dtype != k_cache.dtype:  # rare; one rounding rule (torch's) on every backend
        key = key.to(k_cache.dtype)
    if value.dtype != v_cache.dtype:
        value = value.to(v_cache.dtype)
    args = (
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        *k_cache.stride(), *v_cache.stride(),
        k_cache.shape[1],
    )
    meta = dict(D=D, DV=DV, BD=_p2(D), BDV=_p2(DV), num_warps=1 if D <= 128 else 2, **_pdl(key.device, pdl))
    if _is_tiered(host_k_cache):
        _kv_write_kernel_tiered[(T, H)](*args, *_tier_args(k_cache, host_k_cache), *_tier_args(v_cache, host_v_cache),
                                        k_cache.shape[0], **meta)
    else:
        _kv_write_kernel[(T, H)](*args, **meta)


# ------------------------------------------------------------------------------------------ mask estimation
@triton.jit
def _halves(lo_s, hi_s, ci, cv):
    """Candidate ``ci`` of a halving round: half ``ci % 2`` of group ``ci // 2`` (``[clo, chi)``), valid unless it
    is the right half of a one-block group."""
    side = ci % 2
    l = tl.load(lo_s + ci // 2, mask=cv, other=0)
    hh = tl.load(hi_s + ci // 2, mask=cv, other=1)
    split = hh - l > 1
    mid = (l + hh) // 2
    clo = tl.where(side == 1, mid, l)
    chi = tl.where(side == 1, hh, tl.where(split, mid, hh))
    return clo, chi, cv & ((side == 0) | split)


@triton.jit
def _exact_blocks(lo_s, hi_s, ci, N: tl.constexpr, EXACT: tl.constexpr):
    """Candidate ``ci`` of the exact round: block ``lo[ci // EXACT] + ci % EXACT``, valid below that group's ``hi``."""
    cv = ci < N * EXACT
    l = tl.load(lo_s + ci // EXACT, mask=cv, other=0)
    hh = tl.load(hi_s + ci // EXACT, mask=cv, other=0)
    blk = l + ci % EXACT
    return blk, cv & (blk < hh)


@triton.jit
def _top_n(sc, ok, N: tl.constexpr):
    """The ``N`` best valid scores of ``sc`` (ties: lower index first): the mask of those kept and each one's
    rank in index order (its output slot).

    The N-th largest score is found bit by bit on an order-preserving integer image of the floats (32 counts
    over the vector) rather than by sorting it: a bitonic sort of the exact round's 2,048 scores in one program
    was the serial tail of every search round. Settling 2 or 4 bits per pass (2^bits counts in one 2-D sum) was
    slower on the H200: top 128 of 1,024 in 6.5 us, 7.7 and 10.3 (bench_top_n.py at c11511a, BENCHMARKS.md §1)."""
    bits = (sc + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 becomes +0.0, equal as floats, so as keys
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648  # float order, in [0, 2^32)
    thr = tl.zeros((), tl.int64)
    for b in tl.static_range(32):  # the largest t with at least N keys >= t: the N-th largest key
        cand = thr + (1 << (31 - b))
        cnt = tl.sum((key >= cand).to(tl.int32), axis=0)
        thr = tl.where(cnt >= N, cand, thr)
    gt = key > thr
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    eq = (key == thr) & ok
    eq_rank = tl.cumsum(eq.to(tl.int32), axis=0)
    sel = gt | (eq & (eq_rank <= N - n_gt))
    return sel, tl.cumsum(sel.to(tl.int32), axis=0) - 1


@triton.jit
def _best_halves(sc_s, lo_s, hi_s, N: tl.constexpr, N_PAD: tl.constexpr):
    """A halving round's selection from its 2N scores: the kept halves' mask, output slots and ranges."""
    ci2 = tl.arange(0, 2 * N_PAD)
    cvalid = ci2 < 2 * N
    sc = tl.load(sc_s + ci2, mask=cvalid, other=float("-inf"), cache_modifier=".cg")
    clo2, chi2, _ = _halves(lo_s, hi_s, ci2, cvalid)
    sel, slot = _top_n(sc, cvalid, N)
    return sel, slot, clo2, chi2


@triton.jit
def _scored_queries(q_ptr, start, ln, h, sq0, sq1, sq2, G: tl.constexpr, D: tl.constexpr, NQ: tl.constexpr,
                    NQ_P: tl.constexpr, M_PAD: tl.constexpr, STRIDE: tl.constexpr):
    """The query rows a (query block, KV head) is scored with, ``[M_PAD, D]``: row ``m = g * NQ_P + j`` is head
    ``g`` of the group at the ``j``-th strided row from the block's end; with their validity and ``arange(D)``."""
    m = tl.arange(0, M_PAD)
    g = m // NQ_P
    j = m % NQ_P
    off = ln - 1 - j * STRIDE
    rvalid = (g < G) & (j < NQ) & (off >= 0)
    t = start + tl.maximum(off, 0)
    d = tl.arange(0, D)
    qh = h * G + tl.minimum(g, G - 1)
    qt = tl.load(q_ptr + t[:, None] * sq0 + qh[:, None] * sq1 + d[None, :] * sq2, mask=rvalid[:, None], other=0.0)
    return qt, rvalid, d


@triton.jit
def _reference_max(qt, k_ptr, bt_ptr, req, sbt0, page_size, ws, h, d,
                   sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3, n_dev,
                   sink_tokens, norm_window, c_first, c_step,
                   M_PAD: tl.constexpr, KROWS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   TIERED: tl.constexpr):
    """The normalised score's offsets: each scored row's best ``q . k`` over the keys it attends anyway, in
    chunks ``c_first, c_first + c_step, ...`` of ``KROWS``. Key ``i`` is position ``i`` below ``sink_tokens`` and
    ``ws + i - sink_tokens`` above (the sink, then the window's first ``norm_window`` keys). -inf if no chunk."""
    P = sink_tokens + norm_window
    mx = tl.full((M_PAD,), float("-inf"), tl.float32)
    for i0 in range(c_first * KROWS, P, c_step * KROWS):
        i = i0 + tl.arange(0, KROWS)
        valid = i < P
        pos = tl.where(valid, tl.where(i < sink_tokens, i, ws + i - sink_tokens), 0)
        phys = tl.load(bt_ptr + req * sbt0 + pos // page_size, mask=valid, other=0).to(tl.int64)
        if TIERED:
            kp = _tiered_rows(k_ptr, phys, pos % page_size, h, d, sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2,
                              shk3, n_dev)
        else:
            kp = k_ptr + phys[:, None] * sk0 + (pos % page_size)[:, None] * sk1 + h * sk2 + d[None, :] * sk3
        kt = tl.load(kp, mask=valid[:, None], other=0.0)
        sc = tl.where(valid[None, :], _dot(qt, tl.trans(kt), IEEE, UPCAST), float("-inf"))
        mx = tl.maximum(mx, tl.max(sc, axis=1))
    return mx


@triton.jit
def _block_scores(qt, kt, rvalid, moff, valid, CH: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                  UPCAST: tl.constexpr, NORM: tl.constexpr):
    """Each of ``CH`` candidates' score from its ``BK`` keys ``kt``: the best ``q . k`` over the valid scored rows
    (minus the row's offset ``moff`` with ``NORM``); -inf for invalid keys."""
    s = _dot(qt, tl.trans(kt), IEEE, UPCAST)
    if NORM:
        s = s - moff[:, None]
    s = tl.where(rvalid[:, None], s, float("-inf"))
    srow = tl.where(valid, tl.max(s, axis=0), float("-inf"))
    if BK == 1:
        cs = srow
    else:
        cs = tl.max(tl.reshape(srow, (CH, BK)), axis=1)
    return cs


@triton.jit
def _chunk_scores(qt, rvalid, moff, k_ptr, bt_ptr, req, sbt0, page_size, lo_s, hi_s, c0, h, d,
                  sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3, n_dev,
                  N: tl.constexpr, BK: tl.constexpr, KROWS: tl.constexpr, EXACT: tl.constexpr, HALVES: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr, TIERED: tl.constexpr, NORM: tl.constexpr):
    """Scores of candidates ``c0 .. c0 + KROWS/BK`` of one round: the best ``q . k`` (minus the row's offset
    ``moff`` with ``NORM``) between the strided queries and the ``BK`` keys of each candidate's key block.
    ``HALVES``: a halving round, candidate ``ci`` is half ``ci % 2`` of group ``ci // 2``, judged by its centre
    block; else the exact round, candidate ``ci`` is block ``lo[ci // EXACT] + ci % EXACT`` (valid below that
    group's ``hi``)."""
    CH: tl.constexpr = KROWS // BK
    kr = tl.arange(0, KROWS)
    ci = c0 + kr // BK
    if HALVES:
        clo, chi, valid = _halves(lo_s, hi_s, ci, ci < 2 * N)
        blk = tl.where(valid, (clo + chi - 1) // 2, clo)
    else:
        blk, valid = _exact_blocks(lo_s, hi_s, ci, N=N, EXACT=EXACT)
    pos = tl.where(valid, blk * BK + kr % BK, 0)
    phys = tl.load(bt_ptr + req * sbt0 + pos // page_size, mask=valid, other=0).to(tl.int64)
    if TIERED:
        kp = _tiered_rows(k_ptr, phys, pos % page_size, h, d, sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3,
                          n_dev)
    else:
        kp = k_ptr + phys[:, None] * sk0 + (pos % page_size)[:, None] * sk1 + h * sk2 + d[None, :] * sk3
    kt = tl.load(kp, mask=valid[:, None], other=0.0)
    return _block_scores(qt, kt, rvalid, moff, valid, CH=CH, BK=BK, IEEE=IEEE, UPCAST=UPCAST, NORM=NORM)


@triton.jit
def _cand_chunk_scores(qt, rvalid, moff, k_ptr, v_ptr, bt_ptr, req, sbt0, page_size, lo_s, hi_s, c0, h, d, dv,
                       sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3,
                       sv0, sv1, sv2, sv3, hv_off, shv0, shv1, shv2, shv3, n_dev,
                       ck_base, cv_base, sck2, scv2, gather,
                       N: tl.constexpr, BK: tl.constexpr, KROWS: tl.constexpr, EXACT: tl.constexpr,
                       IEEE: tl.constexpr, UPCAST: tl.constexpr, NORM: tl.constexpr):
    """The exact round's scores of candidates ``c0 .. c0 + KROWS/BK`` with the selection cache (KV offload):
    candidate ``ci``'s ``BK`` keys and values live at rows ``ci * BK ..`` of the (row, head)'s cache at
    ``ck_base``/``cv_base``. ``gather`` (a whole search's exact round): read them from the paged two-tier cache,
    score, and fill the cache; else (an exact-only refresh over the same groups) score the cached keys, so the
    refresh reads no host memory. Same keys either way, so the same scores as ``_chunk_scores``."""
    CH: tl.constexpr = KROWS // BK
    kr = tl.arange(0, KROWS)
    ci = c0 + kr // BK
    blk, valid = _exact_blocks(lo_s, hi_s, ci, N=N, EXACT=EXACT)
    crow = (ci * BK + kr % BK).to(tl.int64)
    ckp = ck_base + crow[:, None] * sck2 + d[None, :]
    if gather:
        pos = tl.where(valid, blk * BK + kr % BK, 0)
        phys = tl.load(bt_ptr + req * sbt0 + pos // page_size, mask=valid, other=0).to(tl.int64)
        kp = _tiered_rows(k_ptr, phys, pos % page_size, h, d, sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3,
                          n_dev)
        kt = tl.load(kp, mask=valid[:, None], other=0.0)
        tl.store(ckp, kt, mask=valid[:, None])
        vp = _tiered_rows(v_ptr, phys, pos % page_size, h, dv, sv0, sv1, sv2, sv3, hv_off, shv0, shv1, shv2, shv3,
                          n_dev)
        vt = tl.load(vp, mask=valid[:, None], other=0.0)
        tl.store(cv_base + crow[:, None] * scv2 + dv[None, :], vt, mask=valid[:, None])
    else:
        kt = tl.load(ckp, mask=valid[:, None], other=0.0)
    return _block_scores(qt, kt, rvalid, moff, valid, CH=CH, BK=BK, IEEE=IEEE, UPCAST=UPCAST, NORM=NORM)


@triton.jit
def _exact_select(sc_s, lo_s, hi_s, out_base, so2, pick_base, N: tl.constexpr, N_PAD: tl.constexpr,
                  EXACT: tl.constexpr, E_PAD: tl.constexpr, CAND: tl.constexpr):
    """Exact round's selection: the N best of the N * EXACT scored blocks (ties: lower position first), written
    to ``out_base`` in position order. ``CAND``: each kept block's candidate index (its rows in the selection
    cache) to ``pick_base`` at the same slot."""
    ci2 = tl.arange(0, E_PAD * N_PAD)
    blk2, ok = _exact_blocks(lo_s, hi_s, ci2, N=N, EXACT=EXACT)
    sc = tl.load(sc_s + ci2, mask=ci2 < N * EXACT, other=float("-inf"), cache_modifier=".cg")
    sel, slot = _top_n(tl.where(ok, sc, float("-inf")), ok, N)
    tl.store(out_base + slot * so2, blk2.to(tl.int32), mask=sel)
    if CAND:
        tl.store(pick_base + slot * so2, ci2.to(tl.int32), mask=sel)


@triton.jit
def _halving_rounds(count, N: tl.constexpr, EXACT: tl.constexpr):
    """Halving rounds of a (query block, head) with ``count`` candidate blocks, and whether an exact round
    follows (groups still span several blocks)."""
    size = (count + N - 1) // N
    rounds = 0
    while size > EXACT:
        size = (size + 1) // 2
        rounds += 1
    return rounds, (size > 1).to(tl.int32)


@triton.jit
def _hip_mask_body(
    q_ptr, k_ptr, bt_ptr,
    qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr,
    out_ptr, out_row_ptr, active_ptr,
    score_ptr, lo_ptr, hi_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2,
    sink_tokens, page_size, norm_window,
    hk_off, shk0, shk1, shk2, shk3, n_dev,
    G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, NQ_P: tl.constexpr, M_PAD: tl.constexpr, STRIDE: tl.constexpr,
    KROWS: tl.constexpr, HAS_ACTIVE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    TIERED: tl.constexpr, EXACT: tl.constexpr, E_PAD: tl.constexpr, SC_W: tl.constexpr, NORM: tl.constexpr,
):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    Hkv = tl.num_programs(1)
    act = 1
    if HAS_ACTIVE:
        act = tl.load(active_ptr + qb).to(tl.int32)
    if act != 0:
        row = tl.load(out_row_ptr + qb).to(tl.int64)
        out_base = out_ptr + row * so0 + h * so1
        ws = tl.load(ws_ptr + qb)
        begin = sink_tokens // BK
        end = ws // BK
        count = tl.maximum(end - begin, 0)
        ar = tl.arange(0, N_PAD)
        if count <= N:
            vals = tl.where(ar < count, begin + ar, -1)
            tl.store(out_base + ar * so2, vals.to(tl.int32), mask=ar < N)
        else:
            req = tl.load(qb_req_ptr + qb).to(tl.int64)
            start = tl.load(qb_start_ptr + qb).to(tl.int64)
            ln = tl.load(qb_len_ptr + qb)
            pid = (qb * Hkv + h).to(tl.int64)
            lo_s = lo_ptr + pid * N_PAD
            hi_s = hi_ptr + pid * N_PAD
            sc_s = score_ptr + pid * SC_W
            qt, rvalid, d = _scored_queries(q_ptr, start, ln, h, sq0, sq1, sq2, G=G, D=D, NQ=NQ, NQ_P=NQ_P,
                                            M_PAD=M_PAD, STRIDE=STRIDE)
            moff = tl.zeros((M_PAD,), tl.float32)
            if NORM:
                moff = _reference_max(qt, k_ptr, bt_ptr, req, sbt0, page_size, ws, h, d,
                                      sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3, n_dev,
                                      sink_tokens, norm_window, 0, 1,
                                      M_PAD=M_PAD, KROWS=KROWS, IEEE=IEEE, UPCAST=UPCAST, TIERED=TIERED)
                moff = tl.where(rvalid, moff, 0.0)
            # initial groups
            lo = begin + (ar * count) // N
            hi = begin + ((ar + 1) * count) // N
            tl.store(lo_s + ar, lo, mask=ar < N)
            tl.store(hi_s + ar, hi, mask=ar < N)
            rounds, exact = _halving_rounds(count, N, EXACT)
            CH: tl.constexpr = KROWS // BK
            for _r in range(rounds):
                tl.debug_barrier()
                # ---- score the 2N halves, KROWS key rows (CH candidates x BK keys) at a time
                for c0 in range(0, 2 * N, CH):
                    cs = _chunk_scores(qt, rvalid, moff, k_ptr, bt_ptr, req, sbt0, page_size, lo_s, hi_s, c0, h,
                                       d, sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3, n_dev,
                                       N=N, BK=BK, KROWS=KROWS, EXACT=EXACT, HALVES=True, IEEE=IEEE, UPCAST=UPCAST,
                                       TIERED=TIERED, NORM=NORM)
                    cc = c0 + tl.arange(0, CH)
                    tl.store(sc_s + cc, cs, mask=cc < 2 * N)
                tl.debug_barrier()
                # ---- keep the N best halves (ties: lower position first), in position order
                sel, slot, clo2, chi2 = _best_halves(sc_s, lo_s, hi_s, N=N, N_PAD=N_PAD)
                tl.debug_barrier()
                tl.store(lo_s + slot, clo2, mask=sel)
                tl.store(hi_s + slot, chi2, mask=sel)
            tl.debug_barrier()
            if exact != 0:
                for c0 in range(0, N * EXACT, CH):
                    cs = _chunk_scores(qt, rvalid, moff, k_ptr, bt_ptr, req, sbt0, page_size, lo_s, hi_s, c0, h,
                                       d, sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3, n_dev,
                                       N=N, BK=BK, KROWS=KROWS, EXACT=EXACT, HALVES=False, IEEE=IEEE,
                                       UPCAST=UPCAST, TIERED=TIERED, NORM=NORM)
                    cc = c0 + tl.arange(0, CH)
                    tl.store(sc_s + cc, cs, mask=cc < N * EXACT)
                tl.debug_barrier()
                _exact_select(sc_s, lo_s, hi_s, out_base, so2, out_base, N=N, N_PAD=N_PAD, EXACT=EXACT, E_PAD=E_PAD,
                              CAND=False)
            else:
                res = tl.load(lo_s + ar, mask=ar < N, other=-1)
                tl.store(out_base + ar * so2, res.to(tl.int32), mask=ar < N)


@triton.jit(do_not_specialize=["sbt0"])
def _hip_mask_kernel(
    q_ptr, k_ptr, bt_ptr,
    qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr,
    out_ptr, out_row_ptr, active_ptr,
    score_ptr, lo_ptr, hi_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2,
    sink_tokens, page_size, norm_window,
    G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, NQ_P: tl.constexpr, M_PAD: tl.constexpr, STRIDE: tl.constexpr,
    KROWS: tl.constexpr, HAS_ACTIVE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    EXACT: tl.constexpr, E_PAD: tl.constexpr, SC_W: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr,
):
    _gdc_enter(PDL)
    _hip_mask_body(
        q_ptr, k_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr, out_ptr, out_row_ptr, active_ptr,
        score_ptr, lo_ptr, hi_ptr, sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2, sink_tokens, page_size,
        norm_window, 0, 0, 0, 0, 0, 0,
        G=G, D=D, N=N, N_PAD=N_PAD, BK=BK, NQ=NQ, NQ_P=NQ_P, M_PAD=M_PAD, STRIDE=STRIDE, KROWS=KROWS,
        HAS_ACTIVE=HAS_ACTIVE, IEEE=IEEE, UPCAST=UPCAST, TIERED=False, EXACT=EXACT, E_PAD=E_PAD, SC_W=SC_W,
        NORM=NORM)


@triton.jit(do_not_specialize=["sbt0", "n_dev", "hk_off"])
def _hip_mask_kernel_tiered(
    q_ptr, k_ptr, bt_ptr,
    qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr,
    out_ptr, out_row_ptr, active_ptr,
    score_ptr, lo_ptr, hi_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2,
    sink_tokens, page_size, norm_window,
    hk_off: tl.int64, shk0, shk1, shk2, shk3, n_dev,
    G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, NQ_P: tl.constexpr, M_PAD: tl.constexpr, STRIDE: tl.constexpr,
    KROWS: tl.constexpr, HAS_ACTIVE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    EXACT: tl.constexpr, E_PAD: tl.constexpr, SC_W: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr,
):
    _gdc_enter(PDL)
    _hip_mask_body(
        q_ptr, k_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr, out_ptr, out_row_ptr, active_ptr,
        score_ptr, lo_ptr, hi_ptr, sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2, sink_tokens, page_size,
        norm_window, hk_off, shk0, shk1, shk2, shk3, n_dev,
        G=G, D=D, N=N, N_PAD=N_PAD, BK=BK, NQ=NQ, NQ_P=NQ_P, M_PAD=M_PAD, STRIDE=STRIDE, KROWS=KROWS,
        HAS_ACTIVE=HAS_ACTIVE, IEEE=IEEE, UPCAST=UPCAST, TIERED=True, EXACT=EXACT, E_PAD=E_PAD, SC_W=SC_W,
        NORM=NORM)


# Round-parallel variant: one launch per round, the 2n halves of every (qb, head) scored by many programs; the
# last program to finish a (qb, head) (atomic counter) does that round's top-n. Same result as the one-launch
# kernel above; far more parallel when QB * Hkv is small (decode) and more loads in flight for prefill.
@triton.jit
def _hip_mask_init_body(
    q_ptr, k_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr, out_ptr, out_row_ptr, active_ptr,
    lo_ptr, hi_ptr, cnt_ptr, norm_ptr, glo_ptr, ghi_ptr, coarse_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2, sink_tokens, page_size, norm_window,
    hk_off, shk0, shk1, shk2, shk3, n_dev,
    G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, NQ_P: tl.constexpr, M_PAD: tl.constexpr, STRIDE: tl.constexpr,
    KROWS: tl.constexpr, HAS_ACTIVE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    TIERED: tl.constexpr, NORM: tl.constexpr, GROUPS: tl.constexpr,
):
    """Program ``(qb, h, 0)``: the initial groups (or the whole selection when the candidates fit in ``N``).
    With ``NORM`` every program ``(qb, h, c)`` also writes its share (chunks ``c, c + NS, ...``) of the rows'
    reference maxima to ``norm_ptr[(qb, h), c]``; the rounds take the max over ``c``. ``GROUPS`` (staged
    refresh): blocks whose ``coarse`` flag is 0 keep their stored groups; the others also store the initial
    groups in the group cache (what the exact round reads when no halving round follows)."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2)
    Hkv = tl.num_programs(1)
    act = 1
    if HAS_ACTIVE:
        act = tl.load(active_ptr + qb).to(tl.int32)
    if act != 0:
        ws = tl.load(ws_ptr + qb)
        begin = sink_tokens // BK
        count = tl.maximum(ws // BK - begin, 0)
        ar = tl.arange(0, N_PAD)
        pid = (qb * Hkv + h).to(tl.int64)
        if c == 0:
            tl.store(cnt_ptr + pid, 0)
            if count <= N:
                row = tl.load(out_row_ptr + qb).to(tl.int64)
                vals = tl.where(ar < count, begin + ar, -1)
                tl.store(out_ptr + row * so0 + h * so1 + ar * so2, vals.to(tl.int32), mask=ar < N)
            else:
                lo0 = begin + (ar * count) // N
                hi0 = begin + ((ar + 1) * count) // N
                tl.store(lo_ptr + pid * N_PAD + ar, lo0, mask=ar < N)
                tl.store(hi_ptr + pid * N_PAD + ar, hi0, mask=ar < N)
                if GROUPS:
                    if tl.load(coarse_ptr + qb) != 0:
                        gb = (tl.load(out_row_ptr + qb).to(tl.int64) * Hkv + h) * N_PAD
                        tl.store(glo_ptr + gb + ar, lo0, mask=ar < N)
                        tl.store(ghi_ptr + gb + ar, hi0, mask=ar < N)
        if NORM:
            if count > N:
                req = tl.load(qb_req_ptr + qb).to(tl.int64)
                start = tl.load(qb_start_ptr + qb).to(tl.int64)
                ln = tl.load(qb_len_ptr + qb)
                qt, rvalid, d = _scored_queries(q_ptr, start, ln, h, sq0, sq1, sq2, G=G, D=D, NQ=NQ, NQ_P=NQ_P,
                                                M_PAD=M_PAD, STRIDE=STRIDE)
                mx = _reference_max(qt, k_ptr, bt_ptr, req, sbt0, page_size, ws, h, d,
                                    sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3, n_dev,
                                    sink_tokens, norm_window, c, tl.num_programs(2),
                                    M_PAD=M_PAD, KROWS=KROWS, IEEE=IEEE, UPCAST=UPCAST, TIERED=TIERED)
                tl.store(norm_ptr + (pid * tl.num_programs(2) + c) * M_PAD + tl.arange(0, M_PAD), mx)


@triton.jit(do_not_specialize=["sbt0"])
def _hip_mask_init_kernel(
    q_ptr, k_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr, out_ptr, out_row_ptr, active_ptr,
    lo_ptr, hi_ptr, cnt_ptr, norm_ptr, glo_ptr, ghi_ptr, coarse_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2, sink_tokens, page_size, norm_window,
    G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, NQ_P: tl.constexpr, M_PAD: tl.constexpr, STRIDE: tl.constexpr,
    KROWS: tl.constexpr, HAS_ACTIVE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, NORM: tl.constexpr,
    GROUPS: tl.constexpr, PDL: tl.constexpr,
):
    _gdc_enter(PDL)
    _hip_mask_init_body(
        q_ptr, k_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr, out_ptr, out_row_ptr, active_ptr,
        lo_ptr, hi_ptr, cnt_ptr, norm_ptr, glo_ptr, ghi_ptr, coarse_ptr, sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0,
        so0, so1, so2, sink_tokens, page_size, norm_window, 0, 0, 0, 0, 0, 0,
        G=G, D=D, N=N, N_PAD=N_PAD, BK=BK, NQ=NQ, NQ_P=NQ_P, M_PAD=M_PAD, STRIDE=STRIDE, KROWS=KROWS,
        HAS_ACTIVE=HAS_ACTIVE, IEEE=IEEE, UPCAST=UPCAST, TIERED=False, NORM=NORM, GROUPS=GROUPS)


@triton.jit(do_not_specialize=["sbt0", "n_dev", "hk_off"])
def _hip_mask_init_kernel_tiered(
    q_ptr, k_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr, out_ptr, out_row_ptr, active_ptr,
    lo_ptr, hi_ptr, cnt_ptr, norm_ptr, glo_ptr, ghi_ptr, coarse_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2, sink_tokens, page_size, norm_window,
    hk_off: tl.int64, shk0, shk1, shk2, shk3, n_dev,
    G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, NQ_P: tl.constexpr, M_PAD: tl.constexpr, STRIDE: tl.constexpr,
    KROWS: tl.constexpr, HAS_ACTIVE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, NORM: tl.constexpr,
    GROUPS: tl.constexpr, PDL: tl.constexpr,
):
    _gdc_enter(PDL)
    _hip_mask_init_body(
        q_ptr, k_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr, out_ptr, out_row_ptr, active_ptr,
        lo_ptr, hi_ptr, cnt_ptr, norm_ptr, glo_ptr, ghi_ptr, coarse_ptr, sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0,
        so0, so1, so2, sink_tokens, page_size, norm_window, hk_off, shk0, shk1, shk2, shk3, n_dev,
        G=G, D=D, N=N, N_PAD=N_PAD, BK=BK, NQ=NQ, NQ_P=NQ_P, M_PAD=M_PAD, STRIDE=STRIDE, KROWS=KROWS,
        HAS_ACTIVE=HAS_ACTIVE, IEEE=IEEE, UPCAST=UPCAST, TIERED=True, NORM=NORM, GROUPS=GROUPS)


@triton.jit
def _hip_mask_round_body(
    q_ptr, k_ptr, bt_ptr,
    qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr,
    out_ptr, out_row_ptr, active_ptr,
    score_ptr, lo_in, hi_in, lo_out, hi_out, cnt_ptr, norm_ptr, glo_ptr, ghi_ptr, coarse_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2,
    sink_tokens, page_size, rnd, cpp,
    hk_off, shk0, shk1, shk2, shk3, n_dev,
    v_ptr, sv0, sv1, sv2, sv3, hv_off, shv0, shv1, shv2, shv3,
    ck_ptr, cv_ptr, pick_ptr, sck0, sck1, sck2, scv0, scv1, scv2,
    G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, NQ_P: tl.constexpr, M_PAD: tl.constexpr, STRIDE: tl.constexpr,
    KROWS: tl.constexpr, HAS_ACTIVE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    TIERED: tl.constexpr, EXACT: tl.constexpr, E_PAD: tl.constexpr, SC_W: tl.constexpr,
    NORM: tl.constexpr, NS: tl.constexpr, GROUPS: tl.constexpr, CAND: tl.constexpr, DV: tl.constexpr,
):
    """``GROUPS`` (staged refresh): the groups entering the exact round live in a per-row cache; blocks whose
    ``coarse`` flag is 0 skip the halving rounds and rescore the groups their last coarse search stored.
    ``CAND`` (KV offload, with ``GROUPS``): the exact round keeps the candidates' keys and values in a per-row
    selection cache (``ck_ptr``/``cv_ptr`` ``[rows, Hkv, N * EXACT * BK, D]``), filled by the coarse searches and
    read by the exact-only refreshes, and records each kept block's candidate index in ``pick_ptr``
    (``_cand_chunk_scores``)."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    c = tl.program_id(2)
    nch = tl.num_programs(2)
    Hkv = tl.num_programs(1)
    act = 1
    if HAS_ACTIVE:
        act = tl.load(active_ptr + qb).to(tl.int32)
    ws = tl.load(ws_ptr + qb)
    begin = sink_tokens // BK
    count = tl.maximum(ws // BK - begin, 0)
    rounds, exact = _halving_rounds(count, N, EXACT)  # count <= N: none (the init kernel selected all)
    go = (act != 0) & (rnd < rounds + exact)
    if GROUPS:
        go = go & ((tl.load(coarse_ptr + qb) != 0) | (rnd == rounds))
    if go:
        req = tl.load(qb_req_ptr + qb).to(tl.int64)
        start = tl.load(qb_start_ptr + qb).to(tl.int64)
        ln = tl.load(qb_len_ptr + qb)
        pid = (qb * Hkv + h).to(tl.int64)
        lo_s = lo_in + pid * N_PAD
        hi_s = hi_in + pid * N_PAD
        lo_d = lo_out + pid * N_PAD
        hi_d = hi_out + pid * N_PAD
        if GROUPS:  # the exact round's input groups: written by the last halving round (or init), read by the exact
            gb = (tl.load(out_row_ptr + qb).to(tl.int64) * Hkv + h) * N_PAD
            if rnd == rounds:
                lo_s = glo_ptr + gb
                hi_s = ghi_ptr + gb
            if rnd == rounds - 1:
                lo_d = glo_ptr + gb
                hi_d = ghi_ptr + gb
        sc_s = score_ptr + pid * SC_W
        qt, rvalid, d = _scored_queries(q_ptr, start, ln, h, sq0, sq1, sq2, G=G, D=D, NQ=NQ, NQ_P=NQ_P,
                                        M_PAD=M_PAD, STRIDE=STRIDE)
        moff = tl.zeros((M_PAD,), tl.float32)
        if NORM:  # the init launch's per-program maxima of the rows' reference logits
            part = tl.load(norm_ptr + (pid * NS + tl.arange(0, NS))[:, None] * M_PAD + tl.arange(0, M_PAD)[None, :])
            moff = tl.where(rvalid, tl.max(part, axis=0), 0.0)
        CH: tl.constexpr = KROWS // BK
        is_exact = rnd == rounds
        # the exact round scores N * EXACT candidates instead of 2N: more chunks per program
        cpp_e = ((N * EXACT + CH - 1) // CH + nch - 1) // nch
        if is_exact:
            for ce0 in range(0, cpp_e):
                c0 = (c * cpp_e + ce0) * CH
                if CAND:
                    crow = tl.load(out_row_ptr + qb).to(tl.int64)
                    cs = _cand_chunk_scores(
                        qt, rvalid, moff, k_ptr, v_ptr, bt_ptr, req, sbt0, page_size, lo_s, hi_s, c0, h, d,
                        tl.arange(0, DV), sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3,
                        sv0, sv1, sv2, sv3, hv_off, shv0, shv1, shv2, shv3, n_dev,
                        ck_ptr + crow * sck0 + h * sck1, cv_ptr + crow * scv0 + h * scv1, sck2, scv2,
                        tl.load(coarse_ptr + qb) != 0,
                        N=N, BK=BK, KROWS=KROWS, EXACT=EXACT, IEEE=IEEE, UPCAST=UPCAST, NORM=NORM)
                else:
                    cs = _chunk_scores(qt, rvalid, moff, k_ptr, bt_ptr, req, sbt0, page_size, lo_s, hi_s, c0, h, d,
                                       sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3, n_dev,
                                       N=N, BK=BK, KROWS=KROWS, EXACT=EXACT, HALVES=False, IEEE=IEEE,
                                       UPCAST=UPCAST, TIERED=TIERED, NORM=NORM)
                cc = c0 + tl.arange(0, CH)
                tl.store(sc_s + cc, cs, mask=cc < N * EXACT)
        for cc0 in range(0, tl.where(is_exact, 0, cpp)):
            c0 = (c * cpp + cc0) * CH
            cs = _chunk_scores(qt, rvalid, moff, k_ptr, bt_ptr, req, sbt0, page_size, lo_s, hi_s, c0, h, d,
                               sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3, n_dev,
                               N=N, BK=BK, KROWS=KROWS, EXACT=EXACT, HALVES=True, IEEE=IEEE, UPCAST=UPCAST,
                               TIERED=TIERED, NORM=NORM)
            cc = c0 + tl.arange(0, CH)
            tl.store(sc_s + cc, cs, mask=cc < 2 * N)
        tl.debug_barrier()  # every thread's score stores precede the release below
        done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if (done == nch - 1) & is_exact:
            tl.debug_barrier()
            tl.store(cnt_ptr + pid, 0)
            row = tl.load(out_row_ptr + qb).to(tl.int64)
            _exact_select(sc_s, lo_s, hi_s, out_ptr + row * so0 + h * so1, so2, pick_ptr + row * so0 + h * so1,
                          N=N, N_PAD=N_PAD, EXACT=EXACT, E_PAD=E_PAD, CAND=CAND)
        elif done == nch - 1:
            tl.debug_barrier()
            tl.store(cnt_ptr + pid, 0)
            sel, slot, clo2, chi2 = _best_halves(sc_s, lo_s, hi_s, N=N, N_PAD=N_PAD)
            if rnd == rounds + exact - 1:
                row = tl.load(out_row_ptr + qb).to(tl.int64)
                tl.store(out_ptr + row * so0 + h * so1 + slot * so2, clo2.to(tl.int32), mask=sel)
            else:
                tl.store(lo_d + slot, clo2, mask=sel)
                tl.store(hi_d + slot, chi2, mask=sel)


@triton.jit(do_not_specialize=["rnd", "cpp", "sbt0"])
def _hip_mask_round_kernel(
    q_ptr, k_ptr, bt_ptr,
    qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr,
    out_ptr, out_row_ptr, active_ptr,
    score_ptr, lo_in, hi_in, lo_out, hi_out, cnt_ptr, norm_ptr, glo_ptr, ghi_ptr, coarse_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2,
    sink_tokens, page_size, rnd, cpp,
    G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, NQ_P: tl.constexpr, M_PAD: tl.constexpr, STRIDE: tl.constexpr,
    KROWS: tl.constexpr, HAS_ACTIVE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    EXACT: tl.constexpr, E_PAD: tl.constexpr, SC_W: tl.constexpr,
    NORM: tl.constexpr, NS: tl.constexpr, GROUPS: tl.constexpr, PDL: tl.constexpr,
):
    _gdc_enter(PDL)
    _hip_mask_round_body(
        q_ptr, k_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr, out_ptr, out_row_ptr, active_ptr,
        score_ptr, lo_in, hi_in, lo_out, hi_out, cnt_ptr, norm_ptr, glo_ptr, ghi_ptr, coarse_ptr,
        sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2,
        sink_tokens, page_size, rnd, cpp,
        0, 0, 0, 0, 0, 0,
        k_ptr, 0, 0, 0, 0, 0, 0, 0, 0, 0, k_ptr, k_ptr, out_ptr, 0, 0, 0, 0, 0, 0,
        G=G, D=D, N=N, N_PAD=N_PAD, BK=BK, NQ=NQ, NQ_P=NQ_P, M_PAD=M_PAD, STRIDE=STRIDE, KROWS=KROWS,
        HAS_ACTIVE=HAS_ACTIVE, IEEE=IEEE, UPCAST=UPCAST, TIERED=False, EXACT=EXACT, E_PAD=E_PAD, SC_W=SC_W,
        NORM=NORM, NS=NS, GROUPS=GROUPS, CAND=False, DV=D)


@triton.jit(do_not_specialize=["rnd", "cpp", "sbt0", "n_dev", "hk_off", "hv_off"])
def _hip_mask_round_kernel_tiered(
    q_ptr, k_ptr, bt_ptr,
    qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr,
    out_ptr, out_row_ptr, active_ptr,
    score_ptr, lo_in, hi_in, lo_out, hi_out, cnt_ptr, norm_ptr, glo_ptr, ghi_ptr, coarse_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2,
    sink_tokens, page_size, rnd, cpp,
    hk_off: tl.int64, shk0, shk1, shk2, shk3, n_dev,
    v_ptr, sv0, sv1, sv2, sv3, hv_off: tl.int64, shv0, shv1, shv2, shv3,
    ck_ptr, cv_ptr, pick_ptr, sck0, sck1, sck2, scv0, scv1, scv2,
    G: tl.constexpr, D: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    NQ: tl.constexpr, NQ_P: tl.constexpr, M_PAD: tl.constexpr, STRIDE: tl.constexpr,
    KROWS: tl.constexpr, HAS_ACTIVE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    EXACT: tl.constexpr, E_PAD: tl.constexpr, SC_W: tl.constexpr,
    NORM: tl.constexpr, NS: tl.constexpr, GROUPS: tl.constexpr, CAND: tl.constexpr, DV: tl.constexpr,
    PDL: tl.constexpr,
):
    _gdc_enter(PDL)
    _hip_mask_round_body(
        q_ptr, k_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, ws_ptr, out_ptr, out_row_ptr, active_ptr,
        score_ptr, lo_in, hi_in, lo_out, hi_out, cnt_ptr, norm_ptr, glo_ptr, ghi_ptr, coarse_ptr,
        sq0, sq1, sq2, sk0, sk1, sk2, sk3, sbt0, so0, so1, so2,
        sink_tokens, page_size, rnd, cpp,
        hk_off, shk0, shk1, shk2, shk3, n_dev,
        v_ptr, sv0, sv1, sv2, sv3, hv_off, shv0, shv1, shv2, shv3,
        ck_ptr, cv_ptr, pick_ptr, sck0, sck1, sck2, scv0, scv1, scv2,
        G=G, D=D, N=N, N_PAD=N_PAD, BK=BK, NQ=NQ, NQ_P=NQ_P, M_PAD=M_PAD, STRIDE=STRIDE, KROWS=KROWS,
        HAS_ACTIVE=HAS_ACTIVE, IEEE=IEEE, UPCAST=UPCAST, TIERED=True, EXACT=EXACT, E_PAD=E_PAD, SC_W=SC_W,
        NORM=NORM, NS=NS, GROUPS=GROUPS, CAND=CAND, DV=DV)


def hip_mask(
    q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *,
    n_select: int, block_size_q: int, block_size_k: int, sink_tokens: int, query_stride: int = 1,
    exact_blocks: int = 1, norm_window: int = 0, out=None, out_row=None, active=None,
    single_launch: bool | None = None, host_k_cache=None, programs: int | None = None,
    krows: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
    groups=None, coarse=None, pdl: bool | None = None, cand=None, v_cache=None, host_v_cache=None,
):
    """HiP v3 key-block selection with an exact last stage (``exact_blocks``), same result as
    ``hip_mask_reference``: ``[QB, Hkv, n]`` int32 (or ``out``).

    ``out``: preallocated ``[M, Hkv, n]`` int32; ``out_row`` int32 ``[QB]``: row of ``out`` written for each
    query block (default ``arange``); ``active`` ``[QB]``: blocks with 0 write nothing. No host sync.

    Default: one launch per refinement round (a static bound from the block table's width; blocks that need
    fewer rounds exit early), each round scored by many programs per (qb, head). ``single_launch=True``: all
    rounds in one program per (qb, head) (identical result; 12x slower for decode batch 1, ~12% faster for
    long prefill on H200). Default (None): one launch when QB * Hkv >= 4 * SMs, else per round.
    ``host_k_cache``: host tier of a two-tier cache (module docstring). ``programs``: programs per (qb, head)
    in each round of the per-round path (default: ~4 per SM for decode, ~16 per SM for prefill); a tuning knob
    for benchmarks; so are ``krows`` (key rows scored per chunk), ``num_warps`` and ``num_stages`` (one-launch path
    only; default 2), and ``pdl`` (programmatic dependent launch, ``_pdl``; default: on sm_90 and newer).
    ``norm_window`` > 0: the normalised score (``hip_mask_reference``); its offsets are computed once per (qb, head)
    before the rounds: inside the program (one launch), or by the init launch spread over up to 8 programs per
    (qb, head) (per round).
    ``groups`` = ``(lo, hi)`` int32 ``[R, Hkv, p2(n_select)]`` and ``coarse`` ``[QB]``: the staged refresh of
    ``hip_mask_reference`` (rows ``out_row``; per-round path only; needs ``exact_blocks`` > 1).
    ``cand`` = ``(cand_k, cand_v, pick)`` (KV offload's selection cache; needs ``groups`` and a host tier, and
    ``v_cache``/``host_v_cache``): ``cand_k``/``cand_v`` ``[R, Hkv, n_select * exact_blocks * block_size_k, D]``
    hold, per mask row, the keys and values of the candidates the last whole search passed to the exact stage
    (filled by that search; exact-only refreshes score them from there), and ``pick`` (int32, ``out``'s shape and
    strides) each selected block's candidate index, which ``hip_attention(cand=...)`` reads. Same selection.
    """
    QB = qb_req.shape[0]
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    n = int(n_select)
    assert D == _p2(D), "head size must be a power of two"
    dev = q.device
    if out is None:
        out = torch.full((QB, Hkv, n), -1, dtype=torch.int32, device=dev)
    if QB == 0:
        return out
    if out_row is None:
        out_row = torch.arange(QB, dtype=torch.int32, device=dev)
    n_pad = _p2(max(n, 1))
    nq = (block_size_q + query_stride - 1) // query_stride
    nq_p = _p2(nq)
    m_pad = max(16, _p2(G * nq_p))
    bk = int(block_size_k)
    # Prefill tiles (M = 4 heads x 32 strided rows = 128): 128-key chunks with 4 warps, measured on the H200 at 128K
    # (sweep_prefill.py, same indices): 46.6 ms against 72.1 with the earlier 32 keys / 8 warps (k 2048), 29.7
    # against 44.5 (k 1024); 16/32/64/256 keys and 8 warps were all slower.
    # Decode tiles (M = 16) keep 64 keys: 128 was faster in the kernel bench (128K mask 86.0 -> 70.9 us at batch 1,
    # 165.7 -> 124.2 at batch 6) but gave nothing end to end in vLLM (BENCHMARKS.md §2, 2026-12-02).
    # The one launch pipelines its chunk loads over 2 stages: 27.42 ms at 128K (k 1024, window 2048) against 29.71
    # with Triton's default of 3 and 31.90 with 4, same indices (sweep_prefill.py, H200, 2026-12-02 16:10).
    default_krows = max(32, bk) if D >= 256 else max(64 if m_pad <= 64 else 128, bk, 16)
    krows = max(int(krows), bk) if krows else default_krows
    nw = num_warps or (4 if D <= 128 or m_pad * krows <= 64 * 64 else 8)
    if single_launch is None:
        single_launch = QB * Hkv >= 4 * _num_sms(dev) and groups is None
    staged = groups is not None
    if staged:
        assert not single_launch and coarse is not None and out_row is not None and int(exact_blocks) > 1, \
            "staged refresh: per-round path, coarse flags, out_row and exact_blocks > 1"
        width = mask_group_width(n)  # == n_pad: the kernels address a row's groups with the N_PAD stride
        assert all(g.dtype == torch.int32 and g.is_contiguous() and g.shape[1:] == (Hkv, width) for g in groups), \
            f"group caches must be contiguous int32 [rows, {Hkv}, {width}]"
    has_active = active is not None
    act = active if has_active else qb_len
    pdl_opts = _pdl(dev, pdl)
    ieee = q.dtype == torch.float32
    tier = (*_tier_args(k_cache, host_k_cache), k_cache.shape[0]) if _is_tiered(host_k_cache) else ()
    exact = max(1, int(exact_blocks))
    e_pad = _p2(exact)
    sc_w = max(2, e_pad) * n_pad  # scores per (qb, head): 2n halves, or n * exact blocks in the exact round
    scratch_sc = torch.empty((QB * Hkv * sc_w,), dtype=torch.float32, device=dev)
    norm = int(norm_window) > 0
    if single_launch:
        scratch_lo = torch.empty((QB * Hkv * n_pad,), dtype=torch.int32, device=dev)
        scratch_hi = torch.empty((QB * Hkv * n_pad,), dtype=torch.int32, device=dev)
        (_hip_mask_kernel_tiered if tier else _hip_mask_kernel)[(QB, Hkv)](
            q, k_cache, block_table, qb_req, qb_start, qb_len, window_start,
            out, out_row, act,
            scratch_sc, scratch_lo, scratch_hi,
            q.stride(0), q.stride(1), q.stride(2), *k_cache.stride(), block_table.stride(0),
            out.stride(0), out.stride(1), out.stride(2),
            int(sink_tokens), k_cache.shape[1], int(norm_window), *tier,
            G=G, D=D, N=n, N_PAD=n_pad, BK=bk, NQ=nq, NQ_P=nq_p, M_PAD=m_pad, STRIDE=int(query_stride),
            KROWS=krows, HAS_ACTIVE=has_active, IEEE=ieee, UPCAST=_INTERPRET, EXACT=exact, E_PAD=e_pad, SC_W=sc_w,
            NORM=norm, num_warps=nw, num_stages=int(num_stages or 2), **pdl_opts,
        )
        return out
    # static bound on the rounds: the longest context the block table can address (no host sync)
    max_count = max(0, (block_table.shape[1] * k_cache.shape[1]) // bk - int(sink_tokens) // bk)
    n_rounds, size = search_schedule(max_count, max(n, 1), exact)
    n_rounds += size > 1  # the exact round
    # ping-pong rows start 16-byte aligned: Triton keys compiled kernels on pointer alignment
    width = _cdiv(QB * Hkv * n_pad, 4) * 4
    lo = torch.empty((2, width), dtype=torch.int32, device=dev).unbind(0)
    hi = torch.empty((2, width), dtype=torch.int32, device=dev).unbind(0)
    cnt = torch.empty((QB * Hkv,), dtype=torch.int32, device=dev)
    out_strides = out.stride()
    # normalised score: each (qb, head)'s reference maxima in ns partial rows, one per init program
    ns = min(8, _p2(_cdiv(int(sink_tokens) + int(norm_window), krows))) if norm else 1
    scratch_norm = torch.empty((QB * Hkv * ns * m_pad,) if norm else (1,), dtype=torch.float32, device=dev)
    g_args = (*groups, coarse) if staged else (cnt, cnt, act)  # unused pointers without GROUPS
    (_hip_mask_init_kernel_tiered if tier else _hip_mask_init_kernel)[(QB, Hkv, ns)](
        q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, out, out_row, act, lo[0], hi[0], cnt,
        scratch_norm, *g_args, *q.stride(), *k_cache.stride(), block_table.stride(0), *out_strides, int(sink_tokens),
        k_cache.shape[1], int(norm_window), *tier,
        G=G, D=D, N=n, N_PAD=n_pad, BK=bk, NQ=nq, NQ_P=nq_p, M_PAD=m_pad, STRIDE=int(query_stride), KROWS=krows,
        HAS_ACTIVE=has_active, IEEE=ieee, UPCAST=_INTERPRET, NORM=norm, GROUPS=staged,
        num_warps=nw if norm else 1, **pdl_opts,
    )
    ch = krows // bk
    total_chunks = _cdiv(2 * n, ch)
    if programs is None:
        if nq == 1:  # decode: ~4 waves' worth of programs, a power of two per (qb, head); measured on the H200
            # (bench_kernels --idle-sweep, 32K and 128K): B=1 64, B=6 8, B=16 4 programs were the fastest, refreshing
            # and idle alike (B=16 128K: 420 us against 455 with the ~16 per SM below)
            programs = 1 << (_cdiv(4 * _num_sms(dev), QB * Hkv).bit_length() - 1)
        else:
            programs = _cdiv(16 * _num_sms(dev), QB * Hkv)
    nch = max(1, min(total_chunks, programs))
    cpp = _cdiv(total_chunks, nch)
    nch = _cdiv(total_chunks, cpp)
    # Arguments shared by every round, built once (this wrapper runs per layer per step in eager steps).
    head = (q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, out, out_row, act, scratch_sc)
    norm_arg = (scratch_norm, *g_args)
    mid = (*q.stride(), *k_cache.stride(), block_table.stride(0), *out_strides, int(sink_tokens), k_cache.shape[1])
    kern = (_hip_mask_round_kernel_tiered if tier else _hip_mask_round_kernel)[(QB, Hkv, nch)]
    meta = dict(G=G, D=D, N=n, N_PAD=n_pad, BK=bk, NQ=nq, NQ_P=nq_p, M_PAD=m_pad, STRIDE=int(query_stride),
                KROWS=krows, HAS_ACTIVE=has_active, IEEE=ieee, UPCAST=_INTERPRET, EXACT=exact, E_PAD=e_pad,
                SC_W=sc_w, NORM=norm, NS=ns, GROUPS=staged, num_warps=nw, **pdl_opts)
    if tier:  # the two-tier kernel also takes the V cache and the selection cache (dummies without ``cand``)
        meta.update(CAND=cand is not None, DV=v_cache.shape[-1] if cand is not None else D)
        tier = (*tier, *_cand_mask_args(cand, k_cache, v_cache, host_v_cache, out, n * exact * bk))
    else:
        assert cand is None, "the selection cache (cand) is for two-tier caches (KV offload) only"
    if cand is not None:
        assert staged, "the selection cache (cand) needs the staged refresh (groups, coarse)"
    for r in range(n_rounds):
        a, b = r % 2, (r + 1) % 2
        kern(*head, lo[a], hi[a], lo[b], hi[b], cnt, *norm_arg, *mid, r, cpp, *tier, **meta)
    return out


# ------------------------------------------------------------------------------------ block-sparse attention
@triton.jit
def _tiered_or_cand_rows(ptr, phys, off, h, d, s0, s1, s2, host_off, hs0, hs1, hs2, n_dev, use_c, c_row):
    """``_tiered_rows`` where rows with ``use_c`` come from the selection cache instead, at element offset
    ``c_row`` from ``ptr`` (unit head-dim strides everywhere, checked by the wrapper)."""
    on_dev = phys < n_dev
    row = tl.where(use_c, c_row,
                   tl.where(on_dev, phys * s0 + off * s1 + h * s2, host_off + (phys - n_dev) * hs0 + off * hs1 + h * hs2))
    return ptr + row[:, None] + d[None, :]


@triton.jit
def _attn_tile(
    tt, qt, qpos, m_i, l_i, acc, idx_base, si2, sink_eff, L_sel, ws, total, bt_ptr, req, sbt0, page_size,
    k_ptr, v_ptr, h, d, dv, nb, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, qk_scale,
    hk_off, shk0, shk1, shk2, shk3, hv_off, shv0, shv1, shv2, shv3, n_dev,
    use_c, pick_base, ck_off, cv_off, sck2, scv2,
    BK: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, TIERED: tl.constexpr,
    CAUSAL: tl.constexpr, CAND: tl.constexpr,
):
    """One online-softmax step over key tile ``tt`` of the attended list (sink, selected blocks, window).

    CAUSAL: apply the per-row causal test (tiles that reach past the first query of the tile); otherwise only the
    per-key validity. (FlashAttention-4's lazy rescaling was tried here and measured slower: BENCHMARKS.md §1.)
    CAND (KV offload): where ``use_c``, selected keys and values come from the row's selection cache, at the
    candidate index ``pick_base`` holds (``hip_mask(cand=...)``): no host read for a selected block.
    """
    vv = tt * BLOCK_N + nb
    in_sink = vv < sink_eff
    u = vv - sink_eff
    in_sel = (u >= 0) & (u < L_sel)
    uc = tl.maximum(u, 0)
    blk = tl.load(idx_base + (uc // BK) * si2, mask=in_sel, other=0)
    pos = tl.where(in_sink, vv, tl.where(in_sel, blk * BK + uc % BK, ws + (u - L_sel)))
    kvalid = (vv < total) & ((~in_sel) | ((pos >= sink_eff) & (pos < ws)))
    pos = tl.where(kvalid, pos, 0)
    poff = pos % page_size
    if CAND:
        from_c = in_sel & kvalid & ((tl.zeros_like(uc) + use_c.to(tl.int32)) != 0)  # a vector: the interpreter
        phys = tl.load(bt_ptr + req * sbt0 + pos // page_size, mask=kvalid & (from_c == 0), other=0).to(tl.int64)
        cidx = tl.load(pick_base + (uc // BK) * si2, mask=from_c, other=0).to(tl.int64) * BK + uc % BK
        kp = _tiered_or_cand_rows(k_ptr, phys, poff, h, d, sk0, sk1, sk2, hk_off, shk0, shk1, shk2, n_dev, from_c,
                                  ck_off + cidx * sck2)
    elif TIERED:
        phys = tl.load(bt_ptr + req * sbt0 + pos // page_size, mask=kvalid, other=0).to(tl.int64)
        kp = _tiered_rows(k_ptr, phys, poff, h, d, sk0, sk1, sk2, sk3, hk_off, shk0, shk1, shk2, shk3, n_dev)
    else:
        phys = tl.load(bt_ptr + req * sbt0 + pos // page_size, mask=kvalid, other=0).to(tl.int64)
        kp = k_ptr + phys[:, None] * sk0 + poff[:, None] * sk1 + h * sk2 + d[None, :] * sk3
    kt = tl.load(kp, mask=kvalid[:, None], other=0.0)
    s = _dot(qt, tl.trans(kt), IEEE, UPCAST)
    if CAUSAL:
        ok = kvalid[None, :] & (pos[None, :] <= qpos[:, None])
        s = tl.where(ok, s * qk_scale, float("-inf"))
    else:
        s = s * qk_scale + tl.where(kvalid, 0.0, float("-inf"))[None, :]
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    m_i = m_new
    if CAND:
        vp = _tiered_or_cand_rows(v_ptr, phys, poff, h, dv, sv0, sv1, sv2, hv_off, shv0, shv1, shv2, n_dev, from_c,
                                  cv_off + cidx * scv2)
    elif TIERED:
        vp = _tiered_rows(v_ptr, phys, poff, h, dv, sv0, sv1, sv2, sv3, hv_off, shv0, shv1, shv2, shv3, n_dev)
    else:
        vp = v_ptr + phys[:, None] * sv0 + poff[:, None] * sv1 + h * sv2 + dv[None, :] * sv3
    vt = tl.load(vp, mask=kvalid[:, None], other=0.0)
    acc = acc + _dot(p.to(vt.dtype), vt, IEEE, UPCAST)
    return m_i, l_i, acc


@triton.jit
def _hip_attn_body(
    q_ptr, k_ptr, v_ptr, bt_ptr,
    qb_req_ptr, qb_start_ptr, qb_len_ptr, qb_pos0_ptr, ws_ptr, idx_ptr, idx_row_ptr,
    o_ptr, po_ptr, plse_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, si0, si1, si2, so0, so1, so2,
    QB, T, Hq, sink_tokens, page_size, qk_scale,
    hk_off, shk0, shk1, shk2, shk3, hv_off, shv0, shv1, shv2, shv3, n_dev,
    pick_ptr, ck_rel, cv_rel, sck0, sck1, sck2, scv0, scv1, scv2,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    QR: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    TIERED: tl.constexpr, CAUSAL_TAIL: tl.constexpr, CAND: tl.constexpr, EXACT: tl.constexpr,
):
    qb = QB - 1 - tl.program_id(0)  # heaviest (latest) query blocks first
    h = tl.program_id(1)
    sp = tl.program_id(2)
    nsp = tl.num_programs(2)
    req = tl.load(qb_req_ptr + qb).to(tl.int64)
    start = tl.load(qb_start_ptr + qb)
    ln = tl.load(qb_len_ptr + qb)
    p0 = tl.load(qb_pos0_ptr + qb)
    ws = tl.load(ws_ptr + qb)
    irow = tl.load(idx_row_ptr + qb).to(tl.int64)
    sink_eff = tl.minimum(sink_tokens, ws)
    idx_base = idx_ptr + irow * si0 + h * si1
    ar = tl.arange(0, N_PAD)
    idxs = tl.load(idx_base + ar * si2, mask=ar < N, other=-1)
    L_sel = tl.sum((idxs >= 0).to(tl.int32), axis=0) * BK
    use_c = False
    pick_base = idx_base
    ck_off = ck_rel
    cv_off = cv_rel
    if CAND:  # the row's selection came from an exact round (else from the init or a halving round: no cache)
        count = tl.maximum(ws // BK - sink_tokens // BK, 0)
        _r, ex = _halving_rounds(count, N, EXACT)
        use_c = (count > N) & (ex != 0)
        pick_base = pick_ptr + irow * si0 + h * si1
        ck_off = ck_rel + irow * sck0 + h * sck1
        cv_off = cv_rel + irow * scv0 + h * scv1
    mm = tl.arange(0, M)
    ii = mm // G
    gg = mm % G
    d = tl.arange(0, D)
    dv = tl.arange(0, DV)
    nb = tl.arange(0, BLOCK_N)
    for sub in range(0, tl.cdiv(ln, QR)):
        r0 = sub * QR
        rvalid = (ii < QR) & (r0 + ii < ln)
        trow = (start + r0 + tl.minimum(ii, QR - 1)).to(tl.int64)
        qhead = h * G + gg
        qpos = p0 + r0 + ii
        qt = tl.load(q_ptr + trow[:, None] * sq0 + qhead[:, None] * sq1 + d[None, :] * sq2,
                     mask=rvalid[:, None], other=0.0)
        last_pos = p0 + tl.minimum(r0 + QR, ln) - 1
        L_win = last_pos + 1 - ws
        total = sink_eff + L_sel + L_win
        n_tiles = tl.cdiv(total, BLOCK_N)
        if SPLIT:
            per = tl.cdiv(n_tiles, nsp)
            t0 = sp * per
            t1 = tl.minimum(t0 + per, n_tiles)
        else:
            t0 = 0
            t1 = n_tiles
        m_i = tl.full((M,), float("-inf"), tl.float32)
        l_i = tl.zeros((M,), tl.float32)
        acc = tl.zeros((M, DV), tl.float32)
        if CAUSAL_TAIL:
            # Keys at positions <= the tile's first query are visible to every row: sink and selected keys (all
            # below the window start) and the window's head. Only the tiles after them need the 2D causal test.
            first_q = p0 + r0
            n_vis = tl.where(ws <= first_q + 1, sink_eff + L_sel + (first_q + 1 - ws), 0)
            t_mid = tl.maximum(tl.minimum(n_vis // BLOCK_N, t1), t0)
        else:
            t_mid = t0
        for tt in range(t0, t_mid):
            m_i, l_i, acc = _attn_tile(
                tt, qt, qpos, m_i, l_i, acc, idx_base, si2, sink_eff, L_sel, ws, total, bt_ptr, req, sbt0,
                page_size, k_ptr, v_ptr, h, d, dv, nb, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, qk_scale,
                hk_off, shk0, shk1, shk2, shk3, hv_off, shv0, shv1, shv2, shv3, n_dev,
                use_c, pick_base, ck_off, cv_off, sck2, scv2,
                BK, BLOCK_N, IEEE, UPCAST, TIERED, False, CAND)
        for tt in range(t_mid, t1):
            m_i, l_i, acc = _attn_tile(
                tt, qt, qpos, m_i, l_i, acc, idx_base, si2, sink_eff, L_sel, ws, total, bt_ptr, req, sbt0,
                page_size, k_ptr, v_ptr, h, d, dv, nb, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, qk_scale,
                hk_off, shk0, shk1, shk2, shk3, hv_off, shv0, shv1, shv2, shv3, n_dev,
                use_c, pick_base, ck_off, cv_off, sck2, scv2,
                BK, BLOCK_N, IEEE, UPCAST, TIERED, True, CAND)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        if SPLIT:
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            prow = (sp * T + trow) * Hq + qhead
            tl.store(po_ptr + prow[:, None] * DV + dv[None, :], o, mask=rvalid[:, None])
            tl.store(plse_ptr + prow, lse, mask=rvalid)
        else:
            tl.store(o_ptr + trow[:, None] * so0 + qhead[:, None] * so1 + dv[None, :] * so2,
                     o.to(o_ptr.dtype.element_ty), mask=rvalid[:, None])


@triton.jit(do_not_specialize=["QB", "T", "sbt0"])
def _hip_attn_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr,
    qb_req_ptr, qb_start_ptr, qb_len_ptr, qb_pos0_ptr, ws_ptr, idx_ptr, idx_row_ptr,
    o_ptr, po_ptr, plse_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, si0, si1, si2, so0, so1, so2,
    QB, T, Hq, sink_tokens, page_size, qk_scale,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    QR: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    CAUSAL_TAIL: tl.constexpr, PDL: tl.constexpr,
):
    _gdc_enter(PDL)
    _hip_attn_body(
        q_ptr, k_ptr, v_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, qb_pos0_ptr, ws_ptr, idx_ptr, idx_row_ptr,
        o_ptr, po_ptr, plse_ptr, sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, si0, si1, si2,
        so0, so1, so2, QB, T, Hq, sink_tokens, page_size, qk_scale,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        idx_ptr, 0, 0, 0, 0, 0, 0, 0, 0,
        G=G, D=D, DV=DV, N=N, N_PAD=N_PAD, BK=BK, QR=QR, M=M, BLOCK_N=BLOCK_N, SPLIT=SPLIT, IEEE=IEEE,
        UPCAST=UPCAST, TIERED=False, CAUSAL_TAIL=CAUSAL_TAIL, CAND=False, EXACT=1)


@triton.jit(do_not_specialize=["QB", "T", "sbt0", "n_dev", "hk_off", "hv_off", "ck_rel", "cv_rel"])
def _hip_attn_kernel_tiered(
    q_ptr, k_ptr, v_ptr, bt_ptr,
    qb_req_ptr, qb_start_ptr, qb_len_ptr, qb_pos0_ptr, ws_ptr, idx_ptr, idx_row_ptr,
    o_ptr, po_ptr, plse_ptr,
    sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, si0, si1, si2, so0, so1, so2,
    QB, T, Hq, sink_tokens, page_size, qk_scale,
    hk_off: tl.int64, shk0, shk1, shk2, shk3, hv_off: tl.int64, shv0, shv1, shv2, shv3, n_dev,
    pick_ptr, ck_rel: tl.int64, cv_rel: tl.int64, sck0, sck1, sck2, scv0, scv1, scv2,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, N: tl.constexpr, N_PAD: tl.constexpr, BK: tl.constexpr,
    QR: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    CAUSAL_TAIL: tl.constexpr, CAND: tl.constexpr, EXACT: tl.constexpr, PDL: tl.constexpr,
):
    _gdc_enter(PDL)
    _hip_attn_body(
        q_ptr, k_ptr, v_ptr, bt_ptr, qb_req_ptr, qb_start_ptr, qb_len_ptr, qb_pos0_ptr, ws_ptr, idx_ptr, idx_row_ptr,
        o_ptr, po_ptr, plse_ptr, sq0, sq1, sq2, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3, sbt0, si0, si1, si2,
        so0, so1, so2, QB, T, Hq, sink_tokens, page_size, qk_scale,
        hk_off, shk0, shk1, shk2, shk3, hv_off, shv0, shv1, shv2, shv3, n_dev,
        pick_ptr, ck_rel, cv_rel, sck0, sck1, sck2, scv0, scv1, scv2,
        G=G, D=D, DV=DV, N=N, N_PAD=N_PAD, BK=BK, QR=QR, M=M, BLOCK_N=BLOCK_N, SPLIT=SPLIT, IEEE=IEEE,
        UPCAST=UPCAST, TIERED=True, CAUSAL_TAIL=CAUSAL_TAIL, CAND=CAND, EXACT=EXACT)


@triton.jit(do_not_specialize=["T", "S"])
def _merge_kernel(po_ptr, plse_ptr, o_ptr, qb_start_ptr, qb_len_ptr, T, Hq, so0, so1, so2, S,
                  S_PAD: tl.constexpr, DV: tl.constexpr, PDL: tl.constexpr):
    _gdc_enter(PDL)
    # One program per (query block, q head, row of the block): only rows this launch computed are merged,
    # so a launch never touches output rows of other query blocks (e.g. prefill rows of a mixed batch).
    qb = tl.program_id(0)
    hq = tl.program_id(1)
    i = tl.program_id(2)
    if i < tl.load(qb_len_ptr + qb):
        t = tl.load(qb_start_ptr + qb) + i
        s = tl.arange(0, S_PAD)
        dv = tl.arange(0, DV)
        prow = (s * T + t) * Hq + hq
        lse = tl.load(plse_ptr + prow, mask=s < S, other=float("-inf"))
        mx = tl.max(lse, axis=0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp2(lse - mx)
        po = tl.load(po_ptr + prow[:, None] * DV + dv[None, :], mask=(s < S)[:, None] & (w > 0)[:, None], other=0.0)
        den = tl.sum(w, axis=0)
        o = tl.sum(po * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
        tl.store(o_ptr + t * so0 + hq * so1 + dv * so2, o.to(o_ptr.dtype.element_ty))


def hip_attention(
    q, k_cache, v_cache, block_table, seq_lens, qb_req, qb_start, qb_len, qb_pos0, window_start, indices, *,
    sink_tokens: int, block_size_k: int, scale: float, out=None, indices_row=None,
    num_splits: int | None = None, block_size_q: int | None = None, block_n: int | None = None,
    host_k_cache=None, host_v_cache=None, num_warps: int | None = None, num_stages: int | None = None,
    rows: int | None = None, causal_tail: bool | None = None, pdl: bool | None = None,
    cand=None, exact_blocks: int = 1,
):
    """Block-sparse attention, same result as ``hip_attention_reference``.

    ``indices_row`` int32 ``[QB]``: row of ``indices`` used by each query block (default ``arange``).
    ``num_splits``: split-K factor (default: automatic, > 1 only when the grid is small, e.g. decode).
    ``block_size_q``: largest query-block length (a hint for the tile height; default: 1 if every block is one
    row, i.e. ``T == QB``, else 64). ``host_k_cache`` / ``host_v_cache``: host tier of a two-tier cache (both
    or neither; module docstring). ``num_warps`` / ``num_stages`` / ``rows`` (query rows per tile, times the G
    heads = the tile height): launch knobs for benchmarks (default: the measured choice below). ``causal_tail``: the
    causal test only on tiles past the first query (default: prefill tiles only; exact either way). ``pdl``:
    programmatic dependent launch (``_pdl``; default: on sm_90 and newer). ``cand`` = ``(cand_k, cand_v, pick)``
    (two-tier caches only) with ``exact_blocks``: the selection cache ``hip_mask(cand=...)`` filled; rows whose
    selection came from an exact round read their selected keys and values there. No host sync.
    """
    assert (host_k_cache is None) == (host_v_cache is None), "pass both host tiers or neither"
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    DV = v_cache.shape[-1]
    G = Hq // Hkv
    QB = qb_req.shape[0]
    dev = q.device
    assert D == _p2(D) and DV == _p2(DV), "head sizes must be powers of two"
    if out is None:
        out = torch.empty(T, Hq, DV, dtype=q.dtype, device=dev)
    if QB == 0:
        return out
    if indices_row is None:
        indices_row = torch.arange(QB, dtype=torch.int32, device=dev)
    n = indices.shape[-1]
    max_len = 1 if T == QB else (block_size_q or 64)
    # Prefill tiles of 256 rows (a whole 64-query block of a 4-head group in one pass, so each gathered K/V tile
    # serves twice the rows) with 32-key tiles: 33.0 ms at 128K on the H200 against 44.4 for 128 rows x 64 keys
    # (sweep_prefill.py; 36 variants of rows, block_n, warps, stages). Decode tiles (one row per head) keep 64 keys.
    m_cap = 256 if D <= 128 else 64
    qr = max(1, min(m_cap // G if G <= m_cap else 1, _p2(max_len))) if rows is None else int(rows)
    M = max(16, _p2(qr * G))
    if block_n is None:
        block_n = 32 if M >= 256 or D > 128 else 64
        if _INTERPRET:
            block_n = 32
    if num_splits is None:
        base = QB * Hkv
        target = 4 * _num_sms(dev)
        # measured on H200, 128K/1M decode batch 1 (8 programs): S=4/8/16/32/64 -> 35/22/16/14/16 us.
        # At most ``target`` programs (rounded down, not up): a partial second wave costs a whole program's time.
        # H200, graphs of 8 rows (bench_decode_splits.py): 16K dense rows 110.8 us at S=8 against 147.2 at 9, and
        # 16 rows of 128K sparse 64.8 at S=4 against 69.6 at 5; 6 sparse 128K rows 34.7 against 32.7 (BENCHMARKS §1).
        num_splits = 1 if base >= target // 2 else min(MAX_SPLITS, target // base)
    S = int(num_splits)
    ieee = q.dtype == torch.float32
    if S > 1:
        po = torch.empty((S * T * Hq * DV,), dtype=torch.float32, device=dev)
        plse = torch.empty((S * T * Hq,), dtype=torch.float32, device=dev)
    else:
        po = plse = out
    if num_warps is None:
        # Decode tiles (16 rows x 128): 2 warps, 31.2 us at batch 6 over 128K against 43.9 with 4 (sweep_prefill.py
        # --decode-att-grid, H200, 2026-12-02 16:10: 135 variants of block_n, warps, stages, splits); more programs
        # fit on an SM, so more gathers are in flight.
        num_warps = 2 if M * max(D, DV) <= 16 * 128 else 4 if M * max(D, DV) <= 64 * 128 else 8
    if num_stages is None:
        num_stages = 2 if S > 1 else 3
    # Measured on the H200 (sweep_prefill.py, 2026-12-02 13:37): at 128K prefill the causal test on tail tiles only
    # takes the attention from 33.06 to 28.66 ms; decode rows see every key, and the second loop only costs there
    # (43.7 -> 53.8 us at batch 6). FlashAttention-4's lazy rescaling, tried in the same sweep, cost 3.3 ms at
    # prefill (32.11 vs 28.66) and was within noise at decode (42.2 vs 43.7 us), so it was removed (BENCHMARKS.md §1).
    if causal_tail is None:
        causal_tail = max_len > 1
    tiered = _is_tiered(host_k_cache)
    tier = (*_tier_args(k_cache, host_k_cache), *_tier_args(v_cache, host_v_cache), k_cache.shape[0]) if tiered else ()
    cand_meta = {}
    if tiered:  # the two-tier kernel also takes the selection cache (dummies without ``cand``)
        exact = max(1, int(exact_blocks)) if cand is not None else 1
        cand_meta = dict(CAND=cand is not None, EXACT=exact)
        if cand is None:
            tier = (*tier, indices, 0, 0, 0, 0, 0, 0, 0, 0)
        else:
            _check_cand(cand, k_cache, v_cache, n * exact * int(block_size_k), indices)
            ck, cv, pick = cand
            tier = (*tier, pick, _rel_offset(ck, k_cache), _rel_offset(cv, v_cache), *ck.stride()[:3],
                    *cv.stride()[:3])
    else:
        assert cand is None, "the selection cache (cand) is for two-tier caches (KV offload) only"
    pdl_opts = _pdl(dev, pdl)
    (_hip_attn_kernel_tiered if tiered else _hip_attn_kernel)[(QB, Hkv, S)](
        q, k_cache, v_cache, block_table,
        qb_req, qb_start, qb_len, qb_pos0, window_start, indices, indices_row,
        out, po, plse,
        q.stride(0), q.stride(1), q.stride(2), *k_cache.stride(), *v_cache.stride(), block_table.stride(0),
        indices.stride(0), indices.stride(1), indices.stride(2), out.stride(0), out.stride(1), out.stride(2),
        QB, T, Hq, int(sink_tokens), k_cache.shape[1], float(scale) * 1.4426950408889634, *tier,
        G=G, D=D, DV=DV, N=n, N_PAD=_p2(max(n, 1)), BK=int(block_size_k), QR=qr, M=M, BLOCK_N=block_n,
        SPLIT=S > 1, IEEE=ieee, UPCAST=_INTERPRET, CAUSAL_TAIL=bool(causal_tail),
        num_warps=num_warps, num_stages=num_stages, **cand_meta, **pdl_opts,
    )
    if S > 1:
        _merge_kernel[(QB, Hq, max_len)](po, plse, out, qb_start, qb_len, T, Hq, out.stride(0), out.stride(1), out.stride(2),
                                         S, S_PAD=max(MAX_SPLITS, _p2(S)), DV=DV, num_warps=2, **pdl_opts)
    return out


def dense_attention(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, *, scale, block_size_q=64,
                    num_splits=None, host_k_cache=None, host_v_cache=None):
    """Causal dense attention over the paged cache (HiP with every window starting at 0). Syncs once (host
    block cut); use ``hip_attention`` directly with precomputed query blocks inside graphs."""
    from .reference import make_query_blocks

    qb = make_query_blocks(query_start_loc, seq_lens, block_size_q)
    zeros = torch.zeros_like(qb[0])
    idx = torch.full((qb[0].shape[0], k_cache.shape[2], 1), -1, dtype=torch.int32, device=q.device)
    return hip_attention(q, k_cache, v_cache, block_table, seq_lens, *qb, zeros, idx, sink_tokens=0,
                         block_size_k=1, scale=scale, num_splits=num_splits, block_size_q=block_size_q,
                         host_k_cache=host_k_cache, host_v_cache=host_v_cache)
