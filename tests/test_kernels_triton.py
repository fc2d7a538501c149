"""Triton HiP kernels (kernels/triton_hip.py) against the plain-torch reference.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors at small shapes;
with CUDA they run compiled on the GPU, and the ``cuda``-only tests add real sizes. Fresh random inputs every
test; output buffers are poisoned (NaN / sentinel) before each run. Skipped when triton is missing.

Tolerances, as ||out - ref|| / ||ref|| (reference: fp32 math on the same rounded inputs):
fp32 inputs 1e-5 (ieee dots), fp16 5e-3, bf16 2e-2 (P is rounded to the input dtype before the PV product).
"""
import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CUDA = torch.cuda.is_available()
if not CUDA:
    # must be set before triton is first imported (triton's own jit helpers, e.g. tl.sort, are built then)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set; run this file with "
                    "TRITON_INTERPRET=1 on CPU-only machines", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import kernels.triton_hip as th  # noqa: E402

if th._INTERPRET != (not CUDA):  # imported earlier with the other mode: rebuild our jit functions
    th = importlib.reload(th)

from kernels.reference import (  # noqa: E402
    hip_attention_reference,
    hip_mask_reference,
    kv_write_reference,
    make_query_blocks,
    window_starts,
)

DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
cuda_only = pytest.mark.skipif(not CUDA, reason="real sizes need CUDA")


def _rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite (unwritten?) output"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _problem(seq_lens, q_lens, Hq, Hkv, D, page, dtype, seed, spare_blocks=3):
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    per = max((s + page - 1) // page for s in seq_lens)
    nblocks = B * per + spare_blocks
    # vLLM-like strided cache: [nb, Hkv, page, 2D] viewed as [nb, page, Hkv, D]
    raw = torch.randn(nblocks, Hkv, page, 2 * D, generator=g).to(dtype).to(DEV)
    kc = raw[..., :D].permute(0, 2, 1, 3)
    vc = raw[..., D:].permute(0, 2, 1, 3)
    bt = torch.randperm(nblocks, generator=g)[: B * per].view(B, per).to(torch.int32).to(DEV)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32, device=DEV)
    q = torch.randn(int(sum(q_lens)), Hq, D, generator=g).to(dtype).to(DEV)
    seq = torch.tensor(seq_lens, dtype=torch.int32, device=DEV)
    return q, kc, vc, bt, qsl, seq


# ---------------------------------------------------------------------------------------------- top-n
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _top_n_probe(sc_ptr, ok_ptr, sel_ptr, slot_ptr, L: tl.constexpr, N: tl.constexpr):
    i = tl.arange(0, L)
    sel, slot = th._top_n(tl.load(sc_ptr + i), tl.load(ok_ptr + i) != 0, N)
    tl.store(sel_ptr + i, sel.to(tl.int32))
    tl.store(slot_ptr + i, slot)


def _top_n_expected(sc, ok, n):
    """Keep the n largest of sc (all entries ranked, invalid ones too, as the kernels' -inf scores are), ties
    by lower index, but only valid entries among those tied with the n-th; slot = rank in index order."""
    order = sorted(range(len(sc)), key=lambda i: (-sc[i], i))
    thr = sc[order[n - 1]]
    gt = [v > thr for v in sc]
    room = n - sum(gt)
    sel = []
    for i, v in enumerate(sc):
        take = gt[i] or (v == thr and ok[i] and room > 0)
        room -= int(v == thr and ok[i] and not gt[i] and take)
        sel.append(take)
    slots = [sum(sel[:i]) for i in range(len(sc))]
    return sel, slots


@pytest.mark.parametrize("seed", range(4))
def test_top_n_keeps_the_n_best_with_ties_signed_zeros_and_minus_inf(seed):
    """The in-kernel top-n that every search round uses: planted ties (repeated values straddling the n-th),
    -0.0 next to +0.0, -inf entries and invalid slots, against a plain Python ranking."""
    g = torch.Generator().manual_seed(seed)
    L, n = 64, 16
    sc = torch.randn(L, generator=g)
    sc[torch.randperm(L, generator=g)[:6]] = float("-inf")
    sc[10] = -3e38
    # ties straddling the n-th place: n - 3 scores above v, then v at 7+ places
    v = 0.0 if seed == 1 else float(sc.sort(descending=True).values[n - 3])
    if seed == 1:  # v = 0: n - 3 positives, zeros of both signs after them
        sc = torch.where(sc > 0, -sc.abs() - 1, sc)
        sc[torch.randperm(L, generator=g)[: n - 3]] = torch.rand(n - 3, generator=g) + 1
    below = torch.nonzero((sc < v) & (sc > float("-inf"))).flatten()
    tied = below[torch.randperm(below.numel(), generator=g)[:7]]
    sc[tied] = v
    if seed == 1:
        sc[tied[::2]] = -0.0
    ok = (sc > float("-inf")) & (torch.rand(L, generator=g) > 0.1)
    if seed == 3:  # fewer valid than n: the n-th is -inf and only valid -inf entries fill
        sc[n // 2:] = float("-inf")
        ok[:] = True
    sel = torch.empty(L, dtype=torch.int32, device=DEV)
    slot = torch.empty(L, dtype=torch.int32, device=DEV)
    _top_n_probe[(1,)](sc.to(DEV), ok.to(torch.int32).to(DEV), sel, slot, L=L, N=n)
    want_sel, want_slot = _top_n_expected([float(x) if x != 0 else 0.0 for x in sc], ok.tolist(), n)
    if seed < 3:  # the planted ties straddle the n-th place
        assert sum(x > v for x in sc.tolist()) < n < sum(x >= v for x in sc.tolist())
    got_sel = [bool(v) for v in sel.cpu().tolist()]
    assert got_sel == want_sel
    assert sum(got_sel) == n
    assert [s for s, k in zip(slot.cpu().tolist(), got_sel) if k] == [s for s, k in zip(want_slot, want_sel) if k]


# ---------------------------------------------------------------------------------------------- kv_write
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page", [16, 64])
def test_kv_write(dtype, page):
    g = torch.Generator().manual_seed(page)
    H, D, nb, T = 4, 64, 6, 37
    raw = torch.randn(nb, H, page, 2 * D, generator=g).to(dtype).to(DEV)
    kc = raw[..., :D].permute(0, 2, 1, 3)
    vc = raw[..., D:].permute(0, 2, 1, 3)
    key = torch.randn(T, H, D, generator=g).to(DEV)  # fp32 in, cast on write
    value = torch.randn(T, 2 * H, D, generator=g).to(DEV)[:, ::2]  # strided input
    slots = torch.randperm(nb * page, generator=g)[:T].to(torch.int64)
    slots[::5] = -1
    slots = slots.to(DEV)
    raw_ref = raw.clone()
    kr = raw_ref[..., :D].permute(0, 2, 1, 3)
    vr = raw_ref[..., D:].permute(0, 2, 1, 3)
    kv_write_reference(key, value, kr, vr, slots)
    th.kv_write(key, value, kc, vc, slots)
    assert torch.equal(raw, raw_ref)


# ---------------------------------------------------------------------------------------------- hip_mask
def _mask_case(seq, q_lens, Hq, Hkv, D, page, dtype, bk, n, bq, stride, sink, window, seed, norm=False):
    q, kc, vc, bt, qsl, seql = _problem(seq, q_lens, Hq, Hkv, D, page, dtype, seed)
    qb = make_query_blocks(qsl, seql, bq)
    ws = window_starts(qb[3], window, bk)
    kw = dict(n_select=n, block_size_q=bq, block_size_k=bk, sink_tokens=sink, query_stride=stride,
              norm_window=window if norm else 0)
    ref = hip_mask_reference(q, kc, bt, qb[0], qb[1], qb[2], ws, **kw)
    return q, kc, bt, qb, ws, kw, ref


def _assert_mask_equal(got, ref, max_mismatch_frac=0.0):
    rows_equal = (got == ref).all(-1)
    frac = 1.0 - rows_equal.float().mean().item()
    assert frac <= max_mismatch_frac, f"{frac:.3f} of (qb, head) rows differ\n{got[~rows_equal][:4]}\n{ref[~rows_equal][:4]}"


MASK_CASES = [
    # Hq, Hkv, D, page, dtype, bk, n, bq, stride
    (4, 4, 32, 16, torch.float32, 2, 8, 8, 2),
    (4, 2, 32, 32, torch.float32, 1, 16, 4, 1),
    (8, 2, 64, 16, torch.bfloat16, 4, 8, 8, 2),
    (8, 1, 32, 64, torch.float16, 8, 4, 16, 4),
    (16, 2, 32, 128, torch.float32, 16, 4, 4, 1),
    (4, 1, 32, 16, torch.bfloat16, 64, 2, 8, 2),
]


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("single", [False, True], ids=["rounds", "single"])
@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: f"G{c[0]//c[1]}-D{c[2]}-p{c[3]}-{str(c[4])[6:]}-bk{c[5]}-n{c[6]}")
def test_hip_mask_matches_reference(case, single, norm):
    """``norm``: the normalised score (offsets from sink and window keys, spread over the init programs)."""
    Hq, Hkv, D, page, dtype, bk, n, bq, stride = case
    sink, window = 4, 3 * bk + 5
    # ragged, unaligned; mixed decode (q_len 1) and prefill; one request with no candidates
    L = n * bk
    seq = [7 * L + 13, 3 * L + 5, 20 * L + 3, 9]
    q_lens = [1, 2 * bq + 3, 1, 9]
    q, kc, bt, qb, ws, kw, ref = _mask_case(seq, q_lens, Hq, Hkv, D, page, dtype, bk, n, bq, stride, sink, window,
                                            seed=bk * 7 + n, norm=norm)
    got = torch.full_like(ref, -5)
    th.hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=got, single_launch=single, **kw)
    _assert_mask_equal(got, ref, 0.0 if dtype == torch.float32 else 0.05)


@pytest.mark.parametrize("single", [False, True], ids=["rounds", "single"])
def test_hip_mask_out_row_active(single):
    Hq, Hkv, D, page, bk, n, bq = 4, 2, 32, 16, 2, 8, 4
    q, kc, bt, qb, ws, kw, ref = _mask_case([300, 90, 171], [1, 1, 1], Hq, Hkv, D, page, torch.float32, bk, n, bq,
                                            1, 4, 16, seed=5)
    QB = qb[0].shape[0]
    out = torch.full((7, Hkv, n), -7, dtype=torch.int32, device=DEV)
    out_row = torch.tensor([5, 1, 3], dtype=torch.int32, device=DEV)
    active = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEV)
    res = th.hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=out, out_row=out_row, active=active,
                      single_launch=single, **kw)
    assert res is out
    assert torch.equal(out[5], ref[0]) and torch.equal(out[3], ref[2])
    for r in (0, 1, 2, 4, 6):
        assert (out[r] == -7).all()
    assert QB == 3


def test_hip_mask_planted_needle():
    g = torch.Generator().manual_seed(3)
    Hq, Hkv, D, page, bk, n, sink, window, bq = 8, 2, 32, 16, 2, 16, 4, 64, 4
    L = 1500
    q, kc, vc, bt, qsl, seq = _problem([L, 900], [bq, 1], Hq, Hkv, D, page, torch.float32, seed=9)
    kc.mul_(0.3)
    qb = make_query_blocks(qsl, seq, bq)
    ws = window_starts(qb[3], window, bk)
    G = Hq // Hkv
    needles = {}
    for i in range(qb[0].shape[0]):
        r = int(qb[0][i])
        begin, end = sink // bk, int(ws[i]) // bk
        group = (end - begin) // n
        for h in range(Hkv):
            nb = int(torch.randint(begin + group, end - group, (1,), generator=g))
            needles[i, h] = nb
            rows = q[int(qb[1][i]) : int(qb[1][i]) + int(qb[2][i]), h * G : (h + 1) * G].float()
            direction = rows.mean((0, 1))
            direction = direction / direction.norm()
            for t in range((nb - group // 2) * bk, (nb + group // 2 + 1) * bk):
                w = 1.0 - abs(t / bk - nb) / (group / 2 + 1)
                kc[bt[r, t // page], t % page, h] += 6.0 * w * direction.to(kc.dtype)
    kw = dict(n_select=n, block_size_q=bq, block_size_k=bk, sink_tokens=sink, query_stride=1)
    got = th.hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, **kw)
    for (i, h), nb in needles.items():
        assert nb in got[i, h].tolist()
    _assert_mask_equal(got, hip_mask_reference(q, kc, bt, qb[0], qb[1], qb[2], ws, **kw))


@pytest.mark.parametrize("single", [False, True], ids=["rounds", "single"])
def test_normalised_score_finds_a_quiet_heads_needle_beside_a_loud_head(single):
    """One KV group of two query heads. Head 0 is loud: its query lies along a direction every key shares, so
    its logits are high everywhere (sink and window included) and say nothing about where to look. Head 1 is
    quiet but has a needle: one key block far outside its window that it scores well above anything it attends.
    Under the raw score the loud head's noise decides the max over the group, and the needle is mostly lost;
    the normalised score subtracts each head's best sink/window logit, so the needle wins. Exact scoring of all
    candidates (``exact_blocks`` 16, one exact round) isolates the score from the search."""
    g = torch.Generator().manual_seed(21)
    Hq, Hkv, D, page, bk, n, sink, window, E = 2, 1, 32, 16, 4, 8, 8, 32, 16
    lens = [300, 360, 420, 480, 520]
    q, kc, vc, bt, qsl, seq = _problem(lens, [1] * len(lens), Hq, Hkv, D, page, torch.float32, seed=12)
    u = torch.randn(D, generator=g)
    u = (u / u.norm()).to(DEV)
    kc.mul_(0.1).add_(u)  # every key shares u
    q[:, 0] = 5.0 * u + 0.1 * q[:, 0]  # the loud head: ~5 on every key
    qb = make_query_blocks(qsl, seq, 1)
    ws = window_starts(qb[3], window, bk)
    needles = []
    for i in range(len(lens)):
        nb = int(torch.randint(sink // bk + 1, int(ws[i]) // bk - 1, (1,), generator=g))
        needles.append(nb)
        quiet = q[i, 1] - (q[i, 1] @ u) * u  # head 1: orthogonal to u, so ~0 on ordinary keys
        t = nb * bk + 1
        kc[bt[i, t // page], t % page, 0] += 3.0 * quiet / quiet.norm() ** 2  # q1 . k ~ 3 at the needle
    kw = dict(n_select=n, block_size_q=1, block_size_k=bk, sink_tokens=sink, query_stride=1, exact_blocks=E)
    got = th.hip_mask(q, kc, bt, *qb[:3], ws, norm_window=window, single_launch=single, **kw)
    _assert_mask_equal(got, hip_mask_reference(q, kc, bt, *qb[:3], ws, norm_window=window, **kw))
    assert all(nb in got[i, 0].tolist() for i, nb in enumerate(needles)), (needles, got[:, 0].tolist())
    plain = th.hip_mask(q, kc, bt, *qb[:3], ws, single_launch=single, **kw)
    found_plain = sum(nb in plain[i, 0].tolist() for i, nb in enumerate(needles))
    assert found_plain <= 2, f"the raw score found {found_plain} of 5 needles: the planted structure is too easy"


@pytest.mark.parametrize("single", [False, True], ids=["rounds", "single"])
@pytest.mark.parametrize("exact", [2, 4, 8])
@pytest.mark.parametrize("case", [MASK_CASES[0], MASK_CASES[2], MASK_CASES[3]],
                         ids=lambda c: f"G{c[0]//c[1]}-{str(c[4])[6:]}-bk{c[5]}-n{c[6]}")
def test_hip_mask_exact_stage_matches_reference(case, exact, single):
    """``exact_blocks``: rows that only take all candidates, rows whose groups are small enough for the exact
    round at once (~7n candidates), rows that halve first (~20n), decode and prefill in one launch."""
    Hq, Hkv, D, page, dtype, bk, n, bq, stride = case
    sink, window = 4, 3 * bk + 5
    L = n * bk
    seq = [7 * L + 13, 3 * L + 5, 20 * L + 3, 9]
    q_lens = [1, 2 * bq + 3, 1, 9]
    q, kc, vc, bt, qsl, seql = _problem(seq, q_lens, Hq, Hkv, D, page, dtype, seed=bk * 7 + n + exact)
    qb = make_query_blocks(qsl, seql, bq)
    ws = window_starts(qb[3], window, bk)
    kw = dict(n_select=n, block_size_q=bq, block_size_k=bk, sink_tokens=sink, query_stride=stride,
              exact_blocks=exact)
    ref = hip_mask_reference(q, kc, bt, qb[0], qb[1], qb[2], ws, **kw)
    got = torch.full_like(ref, -5)
    th.hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=got, single_launch=single, **kw)
    _assert_mask_equal(got, ref, 0.0 if dtype == torch.float32 else 0.05)


@pytest.mark.parametrize("single", [False, True], ids=["rounds", "single"])
def test_hip_mask_exact_stage_finds_single_block_needles(single):
    """A needle confined to one key block (a spike, no slope around it for the halving to follow) is found by
    the exact stage wherever the candidates fit it (count <= exact_blocks * n), and the selection is then the
    true top-n blocks; plain v3 (exact_blocks=1) judges halves by their centre blocks and misses some."""
    g = torch.Generator().manual_seed(11)
    Hq, Hkv, D, page, bk, n, sink, window, E = 8, 2, 32, 16, 4, 8, 8, 32, 8
    # candidates ~30-50 blocks (one exact round over all of them: count <= E * n = 64), ~118 and ~310 (halving first)
    lens = [5 * n * bk, 6 * n * bk, 7 * n * bk, 7 * n * bk + 16, 16 * n * bk, 40 * n * bk]
    q, kc, vc, bt, qsl, seq = _problem(lens, [1] * len(lens), Hq, Hkv, D, page, torch.float32, seed=4)
    kc.mul_(0.2)
    qb = make_query_blocks(qsl, seq, 1)
    ws = window_starts(qb[3], window, bk)
    G = Hq // Hkv
    needles = {}
    for i in range(qb[0].shape[0]):
        r, begin, end = int(qb[0][i]), sink // bk, int(ws[i]) // bk
        row = q[int(qb[1][i]), :].float()
        for h in range(Hkv):
            nb = int(torch.randint(begin, end, (1,), generator=g))
            needles[i, h] = nb
            direction = row[h * G: (h + 1) * G].mean(0)
            t = nb * bk + int(torch.randint(0, bk, (1,), generator=g))
            kc[bt[r, t // page], t % page, h] += 8.0 * (direction / direction.norm()).to(kc.dtype)
    kw = dict(n_select=n, block_size_q=1, block_size_k=bk, sink_tokens=sink, query_stride=1)
    got = th.hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, exact_blocks=E, single_launch=single, **kw)
    v3 = th.hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, exact_blocks=1, single_launch=single, **kw)
    _assert_mask_equal(got, hip_mask_reference(q, kc, bt, qb[0], qb[1], qb[2], ws, exact_blocks=E, **kw))
    missed_by_v3 = 0
    for (i, h), nb in needles.items():
        count = int(ws[i]) // bk - sink // bk
        if count <= E * n:  # one exact round over every candidate: the true top-n blocks
            r = int(qb[0][i])
            pos = torch.arange(sink, int(ws[i]), device=DEV)
            keys = kc[bt[r, pos // page].long(), pos % page, h].float()
            s = (q[int(qb[1][i]), h * G: (h + 1) * G].float() @ keys.T).amax(0).view(-1, bk).amax(1)
            want = (torch.topk(s, n).indices + sink // bk).sort().values
            assert torch.equal(got[i, h].long().sort().values, want.long()), (i, h)
            assert nb in got[i, h].tolist(), (i, h, nb)
            missed_by_v3 += nb not in v3[i, h].tolist()
    assert missed_by_v3 > 0  # the case is one where judging halves by their centre blocks is not enough


def _staged_case(seed):
    """Decode rows whose searches halve 4 times, once, not at all (exact round at once), and take all."""
    Hq, Hkv, D, page, bk, n, sink, window, E = 8, 2, 32, 16, 4, 8, 8, 32, 4
    lens = [40 * n * bk + 7, 7 * n * bk + 16, 3 * n * bk, 20, 25 * n * bk + 3]
    q, kc, vc, bt, qsl, seq = _problem(lens, [1] * len(lens), Hq, Hkv, D, page, torch.float32, seed=seed)
    qb = make_query_blocks(qsl, seq, 1)
    ws = window_starts(qb[3], window, bk)
    kw = dict(n_select=n, block_size_q=1, block_size_k=bk, sink_tokens=sink, query_stride=1, exact_blocks=E,
              norm_window=16)
    rows = torch.tensor([3, 0, 5, 1, 4], dtype=torch.int32, device=DEV)  # slots of a 6-row cache
    return q, kc, bt, qb, ws, kw, rows


def _staged_buffers(Hkv, n):
    out = torch.full((6, Hkv, n), -1, dtype=torch.int32, device=DEV)
    groups = tuple(torch.full((6, Hkv, n), -3, dtype=torch.int32, device=DEV) for _ in range(2))
    return out, groups


def _staged_step(q, kc, bt, qb, ws, kw, rows, active, coarse, bufs, triton: bool):
    out, groups = bufs
    if triton:
        th.hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=out, out_row=rows, active=active, groups=groups,
                    coarse=coarse, **kw)
    else:
        keep = active.bool()
        idx = hip_mask_reference(q, kc, bt, qb[0][keep], qb[1][keep], qb[2][keep], ws[keep], groups=groups,
                                 groups_row=rows[keep], coarse=coarse[keep], **kw)
        out[rows[keep].long()] = idx


def test_staged_refresh_matches_reference():
    """Staged refresh (InfiniteHiP's per-stage intervals): a coarse step runs the whole search and keeps the groups
    that enter the exact round; later steps with ``coarse`` 0 rerun only the exact round over those groups. The
    kernels and the reference agree on the selections and on the stored groups, step after step, for rows that
    halve 4 times, once, never, and take all; inactive rows keep their rows."""
    q, kc, bt, qb, ws, kw, rows = _staged_case(seed=31)
    Hkv, n = kc.shape[2], kw["n_select"]
    tri, ref = _staged_buffers(Hkv, n), _staged_buffers(Hkv, n)
    g = torch.Generator().manual_seed(5)
    steps = [([1, 1, 1, 1, 1], [1, 1, 1, 1, 1]), ([1, 1, 1, 1, 0], [0, 0, 0, 0, 0]), ([1, 0, 1, 1, 1], [0, 1, 0, 1, 0]),
             ([1, 1, 1, 1, 1], [0, 0, 0, 0, 1])]
    full = None
    for step, (active, coarse) in enumerate(steps):
        if step:  # the next token's query: close to the last one, as in decode
            q = q + 0.5 * torch.randn(q.shape, generator=g).to(q)
        a = torch.tensor(active, dtype=torch.int32, device=DEV)
        c = torch.tensor(coarse, dtype=torch.bool, device=DEV)
        _staged_step(q, kc, bt, qb, ws, kw, rows, a, c, tri, triton=True)
        _staged_step(q, kc, bt, qb, ws, kw, rows, a, c, ref, triton=False)
        assert torch.equal(tri[0], ref[0]), step
        stored = ref[1][0] != -3  # rows whose search stored groups (the take-all row never does)
        assert torch.equal(tri[1][0][stored], ref[1][0][stored]) and torch.equal(tri[1][1][stored], ref[1][1][stored])
        if step == 0:
            full = hip_mask_reference(q, kc, bt, qb[0], qb[1], qb[2], ws, **kw)
            assert torch.equal(tri[0][rows.long()], full)  # a coarse step is the plain search
    # rows that halve have groups wider than one block; the take-all row (20 tokens) stored none
    assert (tri[1][0][rows[3].long()] == -3).all() and ((tri[1][1] - tri[1][0])[rows[0].long()] > 1).any()


def test_staged_refresh_through_ops_on_cpu_tensors():
    """The CPU backend's path (``ops.mask`` on CPU tensors: the reference, with the ``active`` rows filtered out
    and the group caches addressed through ``out_row``) gives what the kernels give, over a coarse step and an
    exact-only step with some rows inactive."""
    pytest.importorskip("vllm")
    from vllm_hip import ops

    q, kc, bt, qb, ws, kw, rows = _staged_case(seed=33)
    Hkv, n = kc.shape[2], kw["n_select"]
    tri = _staged_buffers(Hkv, n)
    cpu = tuple(t.cpu() for t in _staged_buffers(Hkv, n)[:1]) + (tuple(t.cpu() for t in _staged_buffers(Hkv, n)[1]),)
    g = torch.Generator().manual_seed(6)
    for active, coarse in (([1, 1, 1, 1, 1], [1, 1, 1, 1, 1]), ([1, 0, 1, 1, 1], [0, 0, 1, 0, 0])):
        a = torch.tensor(active, dtype=torch.int32, device=DEV)
        c = torch.tensor(coarse, dtype=torch.bool, device=DEV)
        _staged_step(q, kc, bt, qb, ws, kw, rows, a, c, tri, triton=True)
        ops.mask(q.cpu(), kc.cpu(), bt.cpu(), *(t.cpu() for t in qb[:3]), ws.cpu(), out=cpu[0], out_row=rows.cpu(),
                 active=a.cpu(), groups=cpu[1], coarse=c.cpu(), **kw)
        assert torch.equal(tri[0].cpu(), cpu[0])
        q = q + 0.5 * torch.randn(q.shape, generator=g).to(q)


def test_staged_refresh_rescores_within_the_stored_groups():
    """After a coarse step, a key block that becomes the best (a spike planted in its keys) is found by an
    exact-only refresh when it lies in a stored group, and is not when it lies outside every stored group: the
    exact round rescores the coarse search's groups and nothing else."""
    q, kc, bt, qb, ws, kw, rows = _staged_case(seed=32)
    Hkv, n, bk, page = kc.shape[2], kw["n_select"], kw["block_size_k"], kc.shape[1]
    G = q.shape[1] // Hkv
    kc.mul_(0.2)
    bufs = _staged_buffers(Hkv, n)
    ones = torch.ones(5, dtype=torch.int32, device=DEV)
    _staged_step(q, kc, bt, qb, ws, kw, rows, ones, ones.bool(), bufs, triton=True)
    out, (glo, ghi) = bufs
    before = out.clone()
    inside, outside = {}, {}
    for i in (0, 1, 4):  # rows that halve
        r, row = int(qb[0][i]), int(rows[i])
        for h in range(Hkv):
            lo, hi = glo[row, h].tolist(), ghi[row, h].tolist()
            in_groups = {b for a, z in zip(lo, hi) for b in range(a, z)}
            chosen = set(before[row, h].tolist())
            cand = sorted(in_groups - chosen)
            out_cand = sorted(set(range(kw["sink_tokens"] // bk, int(ws[i]) // bk)) - in_groups)
            assert cand and out_cand
            inside[i, h], outside[i, h] = cand[len(cand) // 2], out_cand[len(out_cand) // 2]
            direction = q[int(qb[1][i]), h * G:(h + 1) * G].float().mean(0)
            direction = direction / direction.norm()
            for nb in (inside[i, h], outside[i, h]):
                t = nb * bk + 1
                kc[bt[r, t // page], t % page, h] += 8.0 * direction.to(kc.dtype)
    zeros = torch.zeros(5, dtype=torch.bool, device=DEV)
    _staged_step(q, kc, bt, qb, ws, kw, rows, ones, zeros, bufs, triton=True)
    ref = _staged_buffers(Hkv, n)
    ref[1][0].copy_(glo)
    ref[1][1].copy_(ghi)
    _staged_step(q, kc, bt, qb, ws, kw, rows, ones, zeros, ref, triton=False)
    assert torch.equal(out, ref[0])
    for (i, h), nb in inside.items():
        got = out[int(rows[i]), h].tolist()
        assert nb in got and outside[i, h] not in got, (i, h, nb, outside[i, h], got)


# ----------------------------------------------------------------------------------------- hip_attention
def _random_indices(qb, ws, Hkv, n, bk, sink, seed):
    g = torch.Generator().manual_seed(seed)
    QB = qb[0].shape[0]
    idx = torch.full((QB, Hkv, n), -1, dtype=torch.int32)
    wsl = ws.tolist()
    for i in range(QB):
        lo, hi = sink // bk, wsl[i] // bk
        for h in range(Hkv):
            if hi > lo:
                k = int(torch.randint(0, min(n, hi - lo) + 1, (1,), generator=g))
                pick = sorted((torch.randperm(hi - lo, generator=g)[:k] + lo).tolist())
                idx[i, h, : len(pick)] = torch.tensor(pick, dtype=torch.int32)
    return idx.to(DEV)


ATTN_CASES = [
    # Hq, Hkv, D, page, dtype, bk, n, splits
    (4, 4, 32, 16, torch.float32, 2, 6, None),
    (4, 2, 64, 32, torch.bfloat16, 1, 8, 1),
    (8, 2, 32, 16, torch.float16, 4, 5, 3),
    (8, 1, 128, 64, torch.bfloat16, 16, 3, None),
    (16, 2, 32, 128, torch.float32, 8, 4, 2),
    (2, 1, 256, 16, torch.bfloat16, 64, 2, 1),
]


# causal_tail: the causal test on tail tiles only (prefill's default) and on every tile, which must agree
KNOBS = [True, False]


@pytest.mark.parametrize("tail", KNOBS, ids=lambda t: f"tail{int(t)}")
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: f"G{c[0]//c[1]}-D{c[2]}-p{c[3]}-{str(c[4])[6:]}-bk{c[5]}-s{c[7]}")
def test_hip_attention_matches_reference(case, tail):
    Hq, Hkv, D, page, dtype, bk, n, splits = case
    sink, window, bq = 3, 2 * bk + 7, 8
    small = D >= 256
    seq = [5 * n * bk + 29, 50, 3 * n * bk + 11] if not small else [3 * n * bk + 5, 40]
    q_lens = [bq + 5, 1, 1] if not small else [3, 1]
    q, kc, vc, bt, qsl, seql = _problem(seq, q_lens, Hq, Hkv, D, page, dtype, seed=D + bk)
    qb = make_query_blocks(qsl, seql, bq)
    ws = window_starts(qb[3], window, bk)
    idx = _random_indices(qb, ws, Hkv, n, bk, sink, seed=bk)
    scale = D ** -0.5
    kw = dict(sink_tokens=sink, block_size_k=bk, scale=scale)
    ref = hip_attention_reference(q, kc, vc, bt, seql, *qb, ws, idx, **kw)
    out = torch.full_like(q, float("nan"))
    got = th.hip_attention(q, kc, vc, bt, seql, *qb, ws, idx, out=out, num_splits=splits, block_size_q=bq,
                           causal_tail=tail, **kw)
    assert got is out
    assert _rel(got, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rising", [True, False])
def test_hip_attention_rescales_when_logits_rise_from_tile_to_tile(dtype, rising):
    """Planted logits that climb (or fall) by ~12 log2 units per key tile along the attended order (sink, selected,
    window): the accumulator must be rescaled on most tiles, and a rescale that is skipped or applied to the wrong
    rows is off by factors of 2^8 or more, far outside the tolerance. Small windows and 16-row query blocks put
    the causal tail in several tiles."""
    Hq, Hkv, D, page, bk, n, sink, window, bq = 4, 2, 32, 16, 4, 6, 4, 20, 16
    seq, q_lens = [180, 97], [40, 1]
    q, kc, vc, bt, qsl, seql = _problem(seq, q_lens, Hq, Hkv, D, page, dtype, seed=11)
    u = torch.randn(D, generator=torch.Generator().manual_seed(5))
    u = (u / u.norm()).to(DEV)
    q = (q.float() * 0.05 + 6.0 * u).to(dtype)  # every query along u: logit ~ 6 x (key's u component) x scale
    pos = torch.arange(bt.shape[1] * page, device=DEV)
    ramp = (pos.float() / 2.0) if rising else (90.0 - pos.float() / 2.0)
    for r in range(bt.shape[0]):  # key at position p gets a u component that makes its logit ~ramp(p)
        phys = bt[r, pos // page].long()
        k = kc[phys, pos % page].float()
        k = k * 0.05 + (ramp * (D ** 0.5) / 6.0)[:, None, None] * u
        kc[phys, pos % page] = k.to(dtype)
    qb = make_query_blocks(qsl, seql, bq)
    ws = window_starts(qb[3], window, bk)
    idx = _random_indices(qb, ws, Hkv, n, bk, sink, seed=3)
    kw = dict(sink_tokens=sink, block_size_k=bk, scale=D ** -0.5)
    ref = hip_attention_reference(q, kc, vc, bt, seql, *qb, ws, idx, **kw)
    for tail in KNOBS:
        got = th.hip_attention(q, kc, vc, bt, seql, *qb, ws, idx, out=torch.full_like(q, float("nan")),
                               block_size_q=bq, block_n=16, causal_tail=tail, **kw)
        assert _rel(got, ref) < TOL[dtype], tail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hip_attention_dense_and_indices_row(dtype):
    """window_start 0 (dense FlashAttention over the paged cache), and decode rows reading a mask cache."""
    Hq, Hkv, D, page, bk, n, sink = 8, 2, 64, 16, 2, 4, 2
    seq, q_lens = [77, 130, 33], [20, 1, 1]
    q, kc, vc, bt, qsl, seql = _problem(seq, q_lens, Hq, Hkv, D, page, dtype, seed=21)
    qb = make_query_blocks(qsl, seql, 16)
    zeros = torch.zeros_like(qb[0])
    idx = torch.full((qb[0].shape[0], Hkv, 1), -1, dtype=torch.int32, device=DEV)
    kw = dict(sink_tokens=0, block_size_k=1, scale=D ** -0.5)
    ref = hip_attention_reference(q, kc, vc, bt, seql, *qb, zeros, idx, **kw)
    out = torch.full_like(q, float("nan"))
    th.hip_attention(q, kc, vc, bt, seql, *qb, zeros, idx, out=out, **kw)
    assert _rel(out, ref) < TOL[dtype]
    # decode-only batch with masks in a per-request cache of 5 rows
    dq = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEV)
    dseq = torch.tensor([200, 150, 97], dtype=torch.int32, device=DEV)
    q2, kc2, vc2, bt2, qsl2, seq2 = _problem(dseq.tolist(), [1, 1, 1], Hq, Hkv, D, page, dtype, seed=22)
    qb2 = make_query_blocks(dq, seq2, 16)
    ws2 = window_starts(qb2[3], 16, bk)
    cache = torch.full((5, Hkv, n), -1, dtype=torch.int32, device=DEV)
    rows = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEV)
    idx2 = _random_indices(qb2, ws2, Hkv, n, bk, sink, seed=3)
    cache[rows.long()] = idx2
    kw2 = dict(sink_tokens=sink, block_size_k=bk, scale=D ** -0.5)
    ref2 = hip_attention_reference(q2, kc2, vc2, bt2, seq2, *qb2, ws2, idx2, **kw2)
    for splits in (None, 1, 4):
        out2 = torch.full_like(q2, float("nan"))
        th.hip_attention(q2, kc2, vc2, bt2, seq2, *qb2, ws2, cache, indices_row=rows, out=out2, num_splits=splits,
                         **kw2)
        assert _rel(out2, ref2) < TOL[dtype]


def test_mask_then_attention_pipeline():
    """hip_mask output fed to hip_attention equals the reference pipeline (mixed decode + prefill)."""
    Hq, Hkv, D, page, bk, n, bq, sink, window = 8, 2, 32, 16, 2, 8, 8, 4, 16
    seq, q_lens = [260, 181, 120], [1, 17, 1]
    q, kc, vc, bt, qsl, seql = _problem(seq, q_lens, Hq, Hkv, D, page, torch.bfloat16, seed=33)
    qb = make_query_blocks(qsl, seql, bq)
    ws = window_starts(qb[3], window, bk)
    mk = dict(n_select=n, block_size_q=bq, block_size_k=bk, sink_tokens=sink, query_stride=2)
    idx = th.hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, **mk)
    ak = dict(sink_tokens=sink, block_size_k=bk, scale=D ** -0.5)
    ref = hip_attention_reference(q, kc, vc, bt, seql, *qb, ws, hip_mask_reference(q, kc, bt, *qb[:3], ws, **mk), **ak)
    got = th.hip_attention(q, kc, vc, bt, seql, *qb, ws, idx, **ak)
    assert _rel(got, ref) < TOL[torch.bfloat16]


# --------------------------------------------------------------------------------------- real sizes (GPU)
@cuda_only
@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_cuda_real_sizes(G):
    Hkv, D, page, bk, n, bq, sink, window = 2, 128, 16, 2, 256, 64, 128, 1024
    Hq = G * Hkv
    seq, q_lens = [20000, 9000, 3001], [1, 200, 1]
    q, kc, vc, bt, qsl, seql = _problem(seq, q_lens, Hq, Hkv, D, page, torch.bfloat16, seed=G)
    qb = make_query_blocks(qsl, seql, bq)
    ws = window_starts(qb[3], window, bk)
    mk = dict(n_select=n, block_size_q=bq, block_size_k=bk, sink_tokens=sink, query_stride=2)
    ref_idx = hip_mask_reference(q, kc, bt, *qb[:3], ws, **mk)
    out = torch.full((qb[0].shape[0], Hkv, n), -9, dtype=torch.int32, device=DEV)
    idx = th.hip_mask(q, kc, bt, *qb[:3], ws, out=out, **mk)
    _assert_mask_equal(idx, ref_idx, 0.1)
    idx1 = th.hip_mask(q, kc, bt, *qb[:3], ws, out=torch.full_like(out, -9), single_launch=True, **mk)
    _assert_mask_equal(idx1, idx, 0.0)  # the two paths agree bit for bit
    ak = dict(sink_tokens=sink, block_size_k=bk, scale=D ** -0.5)
    ref = hip_attention_reference(q, kc, vc, bt, seql, *qb, ws, ref_idx, **ak)
    got = th.hip_attention(q, kc, vc, bt, seql, *qb, ws, ref_idx, out=torch.full_like(q, float("nan")), **ak)
    assert _rel(got, ref) < TOL[torch.bfloat16]
    zeros = torch.zeros_like(qb[0])
    nidx = torch.full((qb[0].shape[0], Hkv, 1), -1, dtype=torch.int32, device=DEV)
    dk = dict(sink_tokens=0, block_size_k=1, scale=D ** -0.5)
    ref_d = hip_attention_reference(q, kc, vc, bt, seql, *qb, zeros, nidx, **dk)
    got_d = th.hip_attention(q, kc, vc, bt, seql, *qb, zeros, nidx, out=torch.full_like(q, float("nan")), **dk)
    assert _rel(got_d, ref_d) < TOL[torch.bfloat16]


# ------------------------------------------------------------------------ launches sharing one output
def test_split_launches_write_only_their_rows():
    """The backend runs prefill blocks and decode blocks as two launches into one output buffer (a mixed
    batch). Each launch, split-K merge included, must leave the other launch's rows untouched."""
    seq_lens, q_lens = [40, 300, 90], [1, 120, 1]  # decode, chunked prefill, decode
    q, kc, vc, bt, qsl, seq = _problem(seq_lens, q_lens, 4, 2, 32, 16, torch.float32, seed=11)
    qb = make_query_blocks(qsl, seq, 16)
    ws = window_starts(qb[3], 32, 4)
    kw = dict(n_select=8, block_size_q=16, block_size_k=4, sink_tokens=8, query_stride=2)
    idx = hip_mask_reference(q, kc, bt, *qb[:3], ws, **kw)
    ref = hip_attention_reference(q, kc, vc, bt, seq, *qb, ws, idx, sink_tokens=8, block_size_k=4, scale=0.2)
    out = torch.full_like(q, float("nan"))
    is_dec = qb[2] == 1
    for sel, hint in ((~is_dec, 16), (is_dec, 1)):
        part = [t[sel] for t in qb]
        th.hip_attention(q, kc, vc, bt, seq, *part, ws[sel], idx[sel], sink_tokens=8, block_size_k=4, scale=0.2,
                         out=out, block_size_q=hint, num_splits=3)
    assert _rel(out, ref) < TOL[torch.float32]


# ------------------------------------------------------------------ programmatic dependent launch (sm_90+)
@cuda_only
def test_pdl_chain_in_a_cuda_graph_equals_plain_launches():
    """A decode layer's chain (KV write, staged mask refresh, split-K attention and merge) captured in a CUDA graph
    with programmatic dependent launch gives, bit for bit, what the same chain gives with plain launches, replay
    after replay, and matches the reference on the cache as written: each kernel waits for its predecessor's
    writes (``_gdc_enter``), e.g. the mask reads the key the KV write just stored (a key along the query, so a
    mask that read the cache early would score its block differently), the attention reads the mask the last
    round just wrote."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or newer")
    assert th._pdl(torch.device(DEV)) == dict(PDL=True, launch_pdl=True)  # on by default where the GPU has it
    Hkv, G, D, page, bk, n, sink, window, B = 8, 4, 128, 16, 8, 128, 128, 2048, 6
    seq_lens = [40000 + 3000 * i for i in range(B)]
    q0, kc0, vc0, bt, qsl, seq = _problem(seq_lens, [1] * B, G * Hkv, Hkv, D, page, torch.bfloat16, seed=5)
    qb = make_query_blocks(qsl, seq, 1)
    ws = window_starts(qb[3], window, bk)
    rows = torch.arange(B, dtype=torch.int32, device=DEV)
    mk = dict(n_select=n, block_size_q=1, block_size_k=bk, sink_tokens=sink, query_stride=1, exact_blocks=8,
              norm_window=1024)
    ak = dict(sink_tokens=sink, block_size_k=bk, scale=D ** -0.5)
    width = th.mask_group_width(n)
    g = torch.Generator().manual_seed(7)
    q_in = torch.empty_like(q0)
    key_in = torch.empty(B, Hkv, D, dtype=q0.dtype, device=DEV)
    active = torch.ones(B, dtype=torch.int8, device=DEV)  # every row refreshes
    coarse = torch.ones(B, dtype=torch.bool, device=DEV)
    slot = torch.empty(B, dtype=torch.int64, device=DEV)
    runs = []
    for pdl in (False, True):
        kc, vc = kc0.clone(), vc0.clone()
        groups = tuple(torch.zeros((B, Hkv, width), dtype=torch.int32, device=DEV) for _ in range(2))
        idx = torch.full((B, Hkv, n), -1, dtype=torch.int32, device=DEV)
        out = torch.empty_like(q0)

        def step():
            th.kv_write(key_in, key_in, kc, vc, slot, pdl=pdl)
            th.hip_mask(q_in, kc, bt, qb[0], qb[1], qb[2], ws, out=idx, out_row=rows, active=active, groups=groups,
                        coarse=coarse, pdl=pdl, **mk)
            th.hip_attention(q_in, kc, vc, bt, seq, *qb, ws, idx, out=out, pdl=pdl, num_splits=8, **ak)

        q_in.copy_(q0)
        key_in.zero_()
        slot.fill_(-1)
        step()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        runs.append((graph, kc, vc, idx, out, groups))  # the graph holds raw pointers: keep its buffers alive
    for rep in range(6):
        q = torch.randn(q0.shape, generator=g).to(q0.dtype).to(DEV)
        # this replay's key: along head 0's query, far above the window
        pos = torch.tensor([sink + 64 * (rep + 1) * (i + 1) for i in range(B)], device=DEV)
        qh = q.view(B, Hkv, G, D)[:, :, 0].float()
        key_in.copy_((30 * qh / qh.norm(dim=-1, keepdim=True)).to(q.dtype))
        slot.copy_(bt[torch.arange(B, device=DEV), pos // page].long() * page + pos % page)
        q_in.copy_(q)
        coarse.fill_(rep % 3 == 0)  # whole searches and exact-only refreshes over the stored groups
        got = []
        for graph, kc, vc, idx, out, _ in runs:
            graph.replay()
            torch.cuda.synchronize()
            got.append((kc.clone(), vc.clone(), idx.clone(), out.clone()))
        (k0, v0, i0, o0), (k1, v1, i1, o1) = got
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
        assert torch.equal(i0, i1), f"replay {rep}: PDL changed the selection"
        assert torch.equal(o0, o1), f"replay {rep}: PDL changed the attention output"
        if rep % 3 == 0:  # a whole search: the reference's selection on the cache as written this replay
            _assert_mask_equal(i1, hip_mask_reference(q, k1, bt, *qb[:3], ws, **mk), 0.1)
        ref = hip_attention_reference(q, k1, v1, bt, seq, *qb, ws, i1, **ak)
        assert _rel(o1, ref) < TOL[torch.bfloat16]
