"""Decode mask state: refresh schedule, reuse, isolation between requests (no vLLM needed)."""
from types import SimpleNamespace

import torch

from vllm_hip.mask_state import DecodeMaskState

PAGE = 16


def make(interval=4, slots=8, dense_below=0, window=32, bk=4, num_blocks=64, first_steps=0):
    return DecodeMaskState(slots, num_blocks, "cpu", page_size=PAGE, window=window, block_size_k=bk,
                           interval=interval, dense_below=dense_below, first_steps=first_steps)


def table(*rows):
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int32)


def step(st, bt, lens, reqs=None, prompt_step=None):
    """One decode step through the CPU path (``plan_into`` on the torch reference): the step's rows, refresh
    flags and window starts, one per request of ``reqs``."""
    reqs = torch.arange(len(lens)) if reqs is None else torch.tensor(reqs)
    n = reqs.numel()
    out = {k: torch.zeros(n, dtype=torch.int32) for k in ("req", "start", "length", "pos0", "window_start", "row")}
    refresh = torch.zeros(n, dtype=torch.bool)
    st.plan_into(bt, torch.tensor(lens), reqs, prompt_step, torch.arange(len(lens) + 1), out, refresh, triton=False)
    return SimpleNamespace(row=out["row"], refresh=refresh, window_start=out["window_start"])


def test_refresh_every_interval_steps_and_reuse_in_between():
    st = make(interval=4)
    bt = table([3, 9, 11, 12, 13, 14])
    seen = [bool(step(st, bt, [L]).refresh[0]) for L in range(40, 52)]
    assert seen == [True, False, False, False] * 3


def test_first_decode_steps_each_refresh_then_every_interval():
    """``mask_refresh_first_steps``: a fresh mask at each of the first steps, counted from the request's first
    decode step (not from a multiple of the interval), then the interval schedule; again after a resume."""
    st = make(interval=4, first_steps=2)
    bt = table([3, 9, 11, 12, 13, 14])
    seen = [bool(step(st, bt, [L]).refresh[0]) for L in range(41, 50)]
    assert seen == [True, True, False, True, False, False, False, True, False]  # 41-42 first steps; 44, 48
    other = make(interval=4, first_steps=3)  # starting at another length: its own first steps
    assert [bool(step(other, bt, [L]).refresh[0]) for L in range(45, 51)] == [True, True, True, True, False, False]
    # preempted and resumed: its prefill drops the slot, and the first steps start again
    st.invalidate(bt, torch.tensor([60]), torch.tensor([0]))
    assert [bool(step(st, bt, [L]).refresh[0]) for L in range(61, 66)] == [True, True, False, True, False]


def test_slot_follows_the_request_across_pages():
    st = make(interval=8)
    bt = table([3, 9, 11, 12])
    rows = [int(step(st, bt, [L]).row[0]) for L in range(32, 40)]  # crosses from page 1 to page 2 at L=33
    assert len(set(rows)) == 1
    assert [bool(step(st, bt, [L]).refresh[0]) for L in range(40, 42)] == [True, False]


def test_window_start_is_fixed_at_refresh_and_kept_while_reusing():
    st = make(interval=4, window=32, bk=4)
    bt = table([3, 9, 11, 12, 13, 14])
    ws = [int(step(st, bt, [L]).window_start[0]) for L in range(65, 70)]
    # refresh at L=65: last position 64 -> (64-32)//4*4 = 32; reused for L=66, 67; refresh at 68 (a multiple
    # of the interval): (67-32)//4*4 = 32; reused at 69.
    assert ws == [32, 32, 32, 32, 32]
    ws = [int(step(st, bt, [L]).window_start[0]) for L in range(70, 74)]
    assert ws == [32, 32, 36, 36]  # 70, 71 reuse the mask of 68; refresh at 72: (71-32)//4*4 = 36


def test_requests_sharing_a_prefix_keep_separate_slots_and_schedules():
    """n > 1 / a common system prompt: same first blocks, private last blocks."""
    st = make(interval=4)
    bt = table([1, 2, 5], [1, 2, 6], [1, 2, 7])
    plans = [step(st, bt, [40, 40, 40]) for _ in range(1)]
    assert len(set(plans[0].row.tolist())) == 3 and plans[0].refresh.all()
    for L in range(41, 44):
        p = step(st, bt, [L, L, L])
        assert not p.refresh.any() and p.row.tolist() == plans[0].row.tolist()


def test_schedule_does_not_depend_on_other_requests():
    st = make(interval=4)
    alone, mixed = [], []
    a = table([3, 4, 5])
    for L in range(33, 41):
        alone.append(bool(step(st, a, [L]).refresh[0]))
    st = make(interval=4)
    both = table([3, 4, 5], [6, 7, 8], [9, 10, 11])
    for i, L in enumerate(range(33, 41)):
        others = [20 + i, 25 + i] if i % 2 else [20 + i]
        bt = both if i % 2 else both[:2]
        mixed.append(bool(step(st, bt, [L] + others).refresh[0]))
    # first decode step, then every length that is a multiple of 4 (36, 40)
    assert mixed == alone == [True, False, False, True, False, False, False, True]


def test_prefill_of_a_recycled_block_drops_the_old_mask():
    st = make(interval=8)
    bt = table([5, 6, 7])
    step(st, bt, [40])
    assert not bool(step(st, bt, [41]).refresh[0])
    # The request finishes; a new one gets the same blocks and prefills 41 tokens, then decodes at 42.
    st.invalidate(bt, torch.tensor([41]), torch.tensor([0]))
    assert bool(step(st, bt, [42]).refresh[0])


def test_prompt_steps_never_reuse():
    st = make(interval=8)
    bt = table([5, 6, 7])
    step(st, bt, [40])
    p = step(st, bt, [41], prompt_step=torch.tensor([True]))
    assert bool(p.refresh[0])


def test_freed_slots_are_reused_and_never_shared_in_a_step():
    st = make(interval=8, slots=3)
    for i in range(5):  # requests come and go: 3 at a time on 3 slots
        bt = table([10 * i + 1, 10 * i + 2], [10 * i + 3, 10 * i + 4], [10 * i + 5, 10 * i + 6])
        p = step(st, bt, [20, 20, 20])
        assert sorted(p.row.tolist()) == [0, 1, 2] and p.refresh.all()


def test_dense_below_threshold_skips_masks_and_padding_is_inert():
    st = make(dense_below=64)
    p = step(st, table([3, 4, 5, 6, 7], [2, 9, 10, 11, 12], [0, 0, 0, 0, 0]), [64, 65, 0])
    assert p.refresh.tolist() == [False, True, False]
    assert int(p.window_start[0]) == 0 and int(p.window_start[2]) == 0


def test_refreshes_of_requests_in_lockstep_are_staggered_by_their_lengths():
    """Requests decoding together refresh at their own positions (every `interval` tokens from their first
    decode step), so requests of different lengths spread their refreshes over the steps: after the first step
    (every request's first mask) one step pays for about a quarter of them, not all."""
    interval, R = 4, 8
    st = make(interval=interval, slots=R, num_blocks=256)
    bt = table(*[[10 * r + p for p in range(8)] for r in range(R)])
    start = [40 + r for r in range(R)]  # prompt lengths 40..47
    counts = [int(step(st, bt, [L + t for L in start]).refresh.sum()) for t in range(12)]
    assert counts[0] == R
    assert counts[1:] == [R // interval] * 11
