"""The one-launch Triton decode plan (kernels/decode_plan.py) against its torch oracle, step after step.

Random traffic over many steps: requests join, decode, leave and come back on recycled blocks, cross page
boundaries, sit below the dense threshold, are still in their prompt, and padding rows (length 0) fill the
captured batch. Both keep their own slot state; after every step the plan, the decode buffers and the state
(outside the trash entries, whose contents are unspecified) must be identical. Under the Triton interpreter on
CPU; on a GPU the compiled kernel.
"""
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernels.decode_plan import decode_plan  # noqa: E402
from kernels.reference import decode_plan_into_reference, decode_plan_reference  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
PAGE = 16


def _state(slots, blocks):
    return [torch.full((slots + 1,), -1, dtype=torch.int64, device=DEV),
            torch.zeros(slots + 1, dtype=torch.int64, device=DEV),
            torch.zeros(slots + 1, dtype=torch.int64, device=DEV),
            torch.full((blocks + 1,), slots, dtype=torch.int64, device=DEV),
            torch.zeros(slots + 1, dtype=torch.int64, device=DEV)]


@pytest.mark.parametrize("seed,interval,dense_below,rows,to_fa,first,coarse",
                         [(0, 4, 0, 8, False, 0, 0), (1, 8, 40, 8, False, 8, 0), (2, 1, 0, 5, False, 3, 0),
                          (3, 3, 70, 16, False, 5, 0), (4, 8, 0, 300, False, 8, 0), (5, 4, 60, 8, True, 0, 0),
                          (6, 8, 100, 16, True, 6, 0), (7, 4, 0, 8, False, 2, 16), (8, 2, 40, 16, True, 0, 6),
                          (9, 8, 0, 300, False, 8, 32)])
def test_triton_plan_equals_reference_over_random_traffic(seed, interval, dense_below, rows, to_fa, first, coarse):
    """``to_fa``: dense rows are handed to FlashAttention (length 0 here, their length in ``fa_len``);
    ``first``: refresh at every one of a request's first decode steps; ``coarse``: the staged refresh's
    interval (coarse flags, window starts kept from the coarse refresh)."""
    g = torch.Generator().manual_seed(seed)
    slots, blocks, width = rows, max(96, 4 * rows), 12
    ref, tri, ref2 = _state(slots, blocks), _state(slots, blocks), _state(slots, blocks)
    c_ref, c_tri, c_ref2 = (torch.zeros(slots + 1, dtype=torch.int64, device=DEV) for _ in range(3))
    seen_exact_only = 0
    scratch = torch.zeros(2, slots + 2, dtype=torch.int32, device=DEV)
    free_blocks = list(torch.randperm(blocks, generator=g).tolist())
    live = {}  # request id -> [blocks, length]
    next_id = 0
    for step in range(60):
        # leave / join (blocks recycled through the free list)
        for rid in list(live):
            if torch.rand(1, generator=g) < 0.06:
                free_blocks += live.pop(rid)[0]
        while len(live) < rows and torch.rand(1, generator=g) < 0.5 and len(free_blocks) >= width:
            length = int(torch.randint(20, 150, (1,), generator=g))
            live[next_id] = [[free_blocks.pop(0) for _ in range(width)], length]
            next_id += 1
        ids = list(live)
        n_dec = len(ids)
        n_pad = int(torch.randint(0, rows - n_dec + 1, (1,), generator=g)) if n_dec < rows else 0
        # the batch: decode requests first, then padding rows (length 0, block table of zeros)
        R = n_dec + n_pad
        bt = torch.zeros(max(R, 1), width, dtype=torch.int32)
        seq = torch.zeros(max(R, 1), dtype=torch.int32)
        for i, rid in enumerate(ids):
            bt[i] = torch.tensor(live[rid][0], dtype=torch.int32)
            live[rid][1] += 1
            seq[i] = live[rid][1]
        qsl = torch.arange(max(R, 1) + 1, dtype=torch.int32)
        reqs = torch.arange(R, dtype=torch.int32)
        prompt = (torch.rand(R, generator=g) < 0.1).to(torch.int32)
        bt, seq, qsl, reqs, prompt = (t.to(DEV) for t in (bt, seq, qsl, reqs, prompt))
        kw = dict(page_size=PAGE, window=32, block_size_k=4, interval=interval, dense_below=dense_below,
                  first_steps=first, coarse_interval=coarse)

        want = decode_plan_reference(*ref, bt, seq, reqs.long(), prompt.bool(), coarse_len=c_ref, **kw)
        out = {k: torch.full((rows,), -7, dtype=torch.int32, device=DEV)
               for k in ("req", "start", "length", "pos0", "window_start", "row", "fa_len")}
        refresh = torch.ones(rows, dtype=torch.bool, device=DEV)
        c_out = torch.ones(rows, dtype=torch.bool, device=DEV)
        decode_plan(*tri, scratch, bt, seq, reqs, prompt, qsl, out, refresh, dense_to_fa=to_fa, coarse_len=c_tri,
                    coarse_out=c_out if coarse else None, **kw)

        got = (out["row"][:R], refresh[:R], out["window_start"][:R], c_out[:R] if coarse else refresh[:R])
        seen_exact_only += int((want[1] & ~want[3]).sum())
        assert not (want[3] & ~want[1]).any(), "a coarse refresh is a refresh"
        for w, x, name in zip(want, got, ("row", "refresh", "window_start", "coarse")):
            assert torch.equal(w.cpu(), x.cpu()), f"step {step}: {name} {w.tolist()} != {x.tolist()}"
        L = seq[reqs.long()].long()
        assert torch.equal(out["req"][:R].cpu(), reqs.cpu())
        assert torch.equal(out["start"][:R].cpu(), qsl[reqs.long()].cpu())
        to_fa_rows = (L > 0) & (L <= dense_below) if to_fa else torch.zeros_like(L, dtype=torch.bool)
        assert torch.equal(out["length"][:R].cpu(), ((L > 0) & ~to_fa_rows).to(torch.int32).cpu())
        if to_fa:
            assert torch.equal(out["fa_len"][:R].cpu(), torch.where(to_fa_rows, L, 0).to(torch.int32).cpu())
            assert (out["fa_len"][R:] == 0).all(), "padding rows: no keys for FlashAttention"
        else:
            assert (out["fa_len"] == -7).all(), "fa_len is written only with dense_to_fa"
        assert torch.equal(out["pos0"][:R].cpu(), (L - 1).to(torch.int32).cpu())
        assert (out["length"][R:] == 0).all() and not refresh[R:].any(), "padding rows must stay inert"
        # the whole output of the torch path the CPU backend takes (kernels.reference.decode_plan_into_reference)
        ref_out = {k: torch.full((rows,), -7, dtype=torch.int32, device=DEV) for k in out}
        ref_refresh = torch.ones(rows, dtype=torch.bool, device=DEV)
        ref_coarse = torch.ones(rows, dtype=torch.bool, device=DEV)
        decode_plan_into_reference(*ref2, bt, seq, reqs, prompt, qsl, ref_out, ref_refresh, dense_to_fa=to_fa,
                                   coarse_len=c_ref2, coarse_out=ref_coarse if coarse else None, **kw)
        if coarse:
            assert torch.equal(ref_coarse.cpu(), c_out.cpu()) and not c_out[R:].any()
            assert torch.equal(c_ref[:slots].cpu(), c_tri[:slots].cpu()), f"step {step}: coarse_len differs"
        for k in out:
            assert torch.equal(ref_out[k][:R].cpu(), out[k][:R].cpu()), f"step {step}: buffer {k}"
        assert torch.equal(ref_out["fa_len"].cpu(), out["fa_len"].cpu())
        assert torch.equal(ref_refresh.cpu(), refresh.cpu()) and torch.equal(ref_out["length"][R:], out["length"][R:])
        for i, name in ((0, "slot_key"), (1, "refresh_len"), (2, "window_start"), (4, "first_len")):
            assert torch.equal(ref[i][:slots].cpu(), tri[i][:slots].cpu()), f"step {step}: state {name} differs"
        assert torch.equal(ref[3][:blocks].cpu(), tri[3][:blocks].cpu()), f"step {step}: slot_of_block differs"
    if coarse:
        assert seen_exact_only > 0, "the traffic never produced an exact-only refresh"


def test_without_prompt_flags_and_more_requests_than_free_slots():
    """No prompt flags (V2 runner); slots run out: the surplus requests get the trash row and refresh."""
    slots = 3
    ref, tri = _state(slots, 64), _state(slots, 64)
    scratch = torch.zeros(2, slots + 2, dtype=torch.int32, device=DEV)
    bt = torch.arange(5 * 4, dtype=torch.int32, device=DEV).view(5, 4)
    seq = torch.tensor([40, 41, 42, 43, 44], dtype=torch.int32, device=DEV)
    reqs = torch.arange(5, dtype=torch.int32, device=DEV)
    qsl = torch.arange(6, dtype=torch.int32, device=DEV)
    kw = dict(page_size=PAGE, window=32, block_size_k=4, interval=4, dense_below=0)
    want = decode_plan_reference(*ref, bt, seq, reqs.long(), None, **kw)
    out = {k: torch.zeros(5, dtype=torch.int32, device=DEV) for k in ("req", "start", "length", "pos0",
                                                                       "window_start", "row")}
    refresh = torch.zeros(5, dtype=torch.bool, device=DEV)
    decode_plan(*tri, scratch, bt, seq, reqs, None, qsl, out, refresh, **kw)
    assert out["row"].tolist() == want[0].tolist() == [0, 1, 2, 3, 3]
    assert refresh.tolist() == want[1].tolist() == [True, True, True, False, False]


def test_staged_refresh_schedule_of_one_request():
    """One request decoding from length 100 with refreshes every 4 steps and coarse ones every 16: the first step
    and every length crossing a multiple of 16 run the whole search; the refreshes between rerun the exact stage
    only and keep the window start of the last coarse refresh (a window that grows until the next one)."""
    slots, page = 2, 16
    st = _state(slots, 64)
    c_len = torch.zeros(slots + 1, dtype=torch.int64, device=DEV)
    bt = torch.arange(12, dtype=torch.int32, device=DEV)[None]
    kw = dict(page_size=page, window=32, block_size_k=4, interval=4, dense_below=0, first_steps=0,
              coarse_interval=16)
    log = []
    for L in range(100, 150):
        seq = torch.tensor([L], dtype=torch.int32, device=DEV)
        row, refresh, ws, coarse = decode_plan_reference(*st, bt, seq, torch.zeros(1, dtype=torch.long, device=DEV),
                                                         None, coarse_len=c_len, **kw)
        log.append((L, bool(refresh), bool(coarse), int(ws)))
    refreshes = [L for L, r, c, w in log if r]
    coarse = [L for L, r, c, w in log if c]
    assert refreshes == [100] + list(range(104, 150, 4))
    assert coarse == [100, 112, 128, 144]
    for L, r, c, w in log:
        last_coarse = max(x for x in coarse if x <= L)
        assert w == (last_coarse - 1 - 32) // 4 * 4, (L, w)
