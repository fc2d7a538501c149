"""The decode mask plan of a step in one Triton launch (CUDA), with the step's decode buffers.

``reference.decode_plan_reference`` is the readable torch version (about a hundred small device ops, each a
launch costing host time every step); this kernel computes the same plan in one program and also writes the
per-request decode buffers the HiP layers read (request, token start, length, position, window start, mask row,
refresh flag; rows past the requests are padding: length 0, no refresh). Slot allocation (the rank-th free slot
for the rank-th request that needs one) goes through two small scratch arrays instead of a sort or a search.
Imports torch and triton only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import decode_plan_reference  # noqa: F401  (the oracle of decode_plan; re-exported)


@triton.jit(do_not_specialize=["n", "sbt0"])
def _decode_plan_kernel(
    bt_ptr, sbt0, W, seq_ptr, req_ptr, prompt_ptr, qsl_ptr, n, rows,
    slot_key_ptr, refresh_len_ptr, ws_state_ptr, slot_of_block_ptr, first_len_ptr, used_ptr, by_rank_ptr,
    out_req, out_start, out_len, out_pos0, out_ws, out_row, out_refresh, out_fa_len, coarse_len_ptr, out_coarse,
    num_slots, num_blocks, page, window, bk, interval, dense_below, first_steps, coarse_interval,
    HAS_PROMPT: tl.constexpr, DENSE_TO_FA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    COARSE: tl.constexpr,
):
    r = tl.arange(0, BLOCK_R)
    rv = r < n
    req = tl.load(req_ptr + r, mask=rv, other=0).to(tl.int64)
    L = tl.load(seq_ptr + req, mask=rv, other=0).to(tl.int64)
    live = (L > 0) & rv
    # Lengths are >= 0, so truncating division equals the reference's floor division wherever it matters
    # (negative positions are clamped to page 0 and negative window starts to 0 in both).
    p_now = tl.minimum(tl.maximum(L - 1, 0) // page, W - 1)
    key_now = tl.load(bt_ptr + req * sbt0 + p_now, mask=rv, other=0).to(tl.int64)
    p_prev = tl.minimum(tl.maximum(L - 2, 0) // page, W - 1)
    new_page = ((L - 1) % page == 0) & (L > 1)
    key_prev = tl.where(new_page, tl.load(bt_ptr + req * sbt0 + p_prev, mask=rv, other=0).to(tl.int64), key_now)
    s_prev = tl.load(slot_of_block_ptr + key_prev % num_blocks, mask=rv, other=num_slots)
    own = (tl.load(slot_key_ptr + s_prev, mask=rv, other=-2) == key_prev) & live
    if HAS_PROMPT:
        own = own & (tl.load(prompt_ptr + r, mask=rv, other=0) == 0)
    last = tl.load(refresh_len_ptr + s_prev, mask=rv, other=0)
    same_run = (L // interval) == (last // interval)
    fresh = (L - tl.load(first_len_ptr + s_prev, mask=rv, other=0)) < first_steps
    dense = L <= dense_below
    refresh = ((own & (L > last) & same_run & (fresh == 0)) == 0) & (dense == 0) & live
    coarse = refresh
    if COARSE:  # staged refresh: the whole search only where the coarse interval's run changes
        c_last = tl.load(coarse_len_ptr + s_prev, mask=rv, other=0)
        same_c = (L // coarse_interval) == (c_last // coarse_interval)
        coarse = refresh & ((own & (L > c_last) & same_c & (fresh == 0)) == 0)

    # Free slots: mark the kept ones, then slot_by_rank[k] = the k-th free slot (k from 1).
    s = tl.arange(0, BLOCK_S)
    tl.store(used_ptr + s, tl.zeros([BLOCK_S], tl.int32), mask=s <= num_slots)
    tl.debug_barrier()
    tl.store(used_ptr + tl.where(own, s_prev, num_slots), tl.full([BLOCK_R], 1, tl.int32), mask=rv)
    tl.debug_barrier()
    # .cg: read what other threads of this program stored before the barrier from L2, never a stale L1 line
    free = (tl.load(used_ptr + s, mask=s < num_slots, other=1, cache_modifier=".cg") == 0) & (s < num_slots)
    free_cum = tl.cumsum(free.to(tl.int32), 0)
    n_free = tl.sum(free.to(tl.int32), 0)
    tl.store(by_rank_ptr + free_cum, s, mask=free)
    need = (own == 0) & live & (dense == 0)
    rank = tl.cumsum(need.to(tl.int32), 0)
    tl.debug_barrier()
    got = need & (rank <= n_free)
    new_slot = tl.load(by_rank_ptr + rank, mask=got, other=0, cache_modifier=".cg").to(tl.int64)
    new_slot = tl.where(got, new_slot, num_slots)
    slot = tl.where(own, s_prev, tl.where(need, new_slot, num_slots))

    new_ws = tl.maximum((L - 1 - window) // bk * bk, 0)
    ws = tl.where(coarse, new_ws, tl.load(ws_state_ptr + slot, mask=rv, other=0))
    ws = tl.where(dense | (live == 0), 0, ws)
    tl.debug_barrier()  # every state read above precedes the writes below

    kept = slot != num_slots
    tl.store(slot_key_ptr + slot, tl.where(kept, key_now, -1), mask=rv)
    tl.store(slot_of_block_ptr + tl.where(kept, key_now % num_blocks, num_blocks), slot, mask=rv)
    wr = tl.where(refresh & kept, slot, num_slots)
    tl.store(refresh_len_ptr + wr, L, mask=rv)
    wc = tl.where(coarse & kept, slot, num_slots)
    tl.store(ws_state_ptr + wc, new_ws, mask=rv)
    if COARSE:
        tl.store(coarse_len_ptr + wc, L, mask=rv)
    tl.store(first_len_ptr + tl.where(kept & (own == 0), slot, num_slots), L, mask=rv)

    # The step's decode buffers; rows in [n, rows) are padding of a captured batch.
    pad = (r >= n) & (r < rows)
    tl.store(out_req + r, req.to(tl.int32), mask=rv)
    tl.store(out_start + r, tl.load(qsl_ptr + req, mask=rv, other=0), mask=rv)
    if DENSE_TO_FA:  # dense rows go to a FlashAttention call (seqused_k = out_fa_len); the HiP kernels skip them
        to_fa = dense & live
        tl.store(out_len + r, tl.where(rv, (live & (to_fa == 0)).to(tl.int32), 0), mask=rv | pad)
        tl.store(out_fa_len + r, tl.where(to_fa, L, 0).to(tl.int32), mask=rv | pad)
    else:
        tl.store(out_len + r, tl.where(rv, (L > 0).to(tl.int32), 0), mask=rv | pad)
    tl.store(out_pos0 + r, (L - 1).to(tl.int32), mask=rv)
    tl.store(out_ws + r, ws.to(tl.int32), mask=rv)
    tl.store(out_row + r, slot.to(tl.int32), mask=rv)
    tl.store(out_refresh + r, (refresh & kept & rv).to(tl.int8), mask=rv | pad)
    if COARSE:
        tl.store(out_coarse + r, (coarse & kept & rv).to(tl.int8), mask=rv | pad)


def decode_plan(slot_key, refresh_len, window_start, slot_of_block, first_len, scratch, block_table, seq_lens,
                reqs, prompt_step, query_start_loc, out: dict, refresh_out, *, page_size: int, window: int,
                block_size_k: int, interval: int, dense_below: int, first_steps: int = 0,
                dense_to_fa: bool = False, coarse_interval: int = 0, coarse_len=None, coarse_out=None) -> None:
    """``decode_plan_reference`` (state updated in place) plus the decode buffers, in one launch. ``reqs`` and
    ``prompt_step`` (or None) int32 on the device; ``scratch`` int32 ``[2, num_slots + 2]``; ``out`` the int32
    buffers ``req``, ``start``, ``length``, ``pos0``, ``window_start``, ``row`` (and ``fa_len`` with
    ``dense_to_fa``, see ``decode_plan_into_reference``); ``refresh_out`` bool. ``coarse_interval`` > 0: the
    staged refresh's state ``coarse_len`` and bool flags ``coarse_out``. No host sync."""
    staged = coarse_interval > 0
    assert not staged or (coarse_len is not None and coarse_out is not None)
    num_slots, num_blocks = slot_key.numel() - 1, slot_of_block.numel() - 1
    rows = out["req"].shape[0]
    n = reqs.shape[0]
    assert n <= rows and scratch.shape[1] >= num_slots + 2
    block_r = triton.next_power_of_2(max(rows, 2))
    _decode_plan_kernel[(1,)](
        block_table, block_table.stride(0), block_table.shape[1], seq_lens, reqs,
        prompt_step if prompt_step is not None else reqs, query_start_loc, n, rows,
        slot_key, refresh_len, window_start, slot_of_block, first_len, scratch[0], scratch[1],
        out["req"], out["start"], out["length"], out["pos0"], out["window_start"], out["row"],
        refresh_out.view(torch.int8), out["fa_len"] if dense_to_fa else out["length"],
        coarse_len if staged else refresh_len, coarse_out.view(torch.int8) if staged else refresh_out.view(torch.int8),
        num_slots, num_blocks, page_size, window, block_size_k, interval, dense_below, first_steps,
        max(1, int(coarse_interval)),
        HAS_PROMPT=prompt_step is not None, DENSE_TO_FA=bool(dense_to_fa), BLOCK_R=block_r,
        BLOCK_S=triton.next_power_of_2(num_slots + 2), COARSE=staged,
        num_warps=min(16, max(4, block_r // 64)),  # max_num_seqs can be 1024: spread the rows over more warps
    )
