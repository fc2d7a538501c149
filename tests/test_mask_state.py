"""Decode mask state: refresh schedule, reuse, and isolation between requests (no vLLM needed)."""
import torch

from vllm_hip.mask_state import DecodeMaskState

PAGE = 16


def make(interval=4, slots=8, dense_below=0, window=32, bk=4):
    return DecodeMaskState(slots, 4, "cpu", page_size=PAGE, window=window, block_size_k=bk,
                           interval=interval, dense_below=dense_below)


def table(*rows):
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.int32)


def test_refresh_every_interval_steps_and_reuse_in_between():
    st = make(interval=4)
    bt = table([3, 9, 11, 12, 13, 14])
    seen = []
    for L in range(40, 52):
        p = st.plan(bt, torch.tensor([L]), torch.tensor([0]))
        seen.append(bool(p.refresh[0]))
        assert int(p.row[0]) == 3 % 8
    assert seen == [True, False, False, False] * 3


def test_window_start_is_fixed_at_refresh_and_kept_while_reusing():
    st = make(interval=4, window=32, bk=4)
    bt = table([3, 9, 11, 12, 13, 14])
    ws = [int(st.plan(bt, torch.tensor([L]), torch.tensor([0])).window_start[0]) for L in range(61, 66)]
    # refresh at L=61: last query position 60 -> (60-32)//4*4 = 28; reused for L=62..64; refresh at 65.
    assert ws == [28, 28, 28, 28, 32]


def test_prefill_invalidates_so_a_recycled_first_block_never_inherits_a_mask():
    st = make(interval=8)
    bt = table([5, 6, 7])
    st.plan(bt, torch.tensor([40]), torch.tensor([0]))  # request A refreshes, owns slot of block 5
    assert not bool(st.plan(bt, torch.tensor([41]), torch.tensor([0])).refresh[0])
    # A finishes; request B gets the same blocks and prefills 41 tokens, then decodes at 42.
    st.invalidate(bt, torch.tensor([0]))
    assert bool(st.plan(bt, torch.tensor([42]), torch.tensor([0])).refresh[0])


def test_anchor_mismatch_forces_refresh():
    st = make(interval=8)
    st.plan(table([5, 6, 7]), torch.tensor([40]), torch.tensor([0]))
    # Same first block but a different block at the refresh position: another request's history.
    assert bool(st.plan(table([5, 6, 99]), torch.tensor([41]), torch.tensor([0])).refresh[0])


def test_colliding_requests_in_one_batch_use_private_rows():
    st = make(interval=8, slots=8)
    bt = table([3, 4], [11, 12], [6, 7])  # 3 and 11 share slot 3
    p = st.plan(bt, torch.tensor([20, 20, 20]), torch.tensor([0, 1, 2]))
    rows = p.row.tolist()
    assert rows[0] >= 8 and rows[1] >= 8 and rows[0] != rows[1] and rows[2] == 6
    p2 = st.plan(bt, torch.tensor([21, 21, 21]), torch.tensor([0, 1, 2]))
    assert p2.refresh.tolist() == [True, True, False]


def test_other_requests_do_not_disturb_a_requests_schedule():
    st = make(interval=4)
    a = table([3, 4, 5])
    both = table([3, 4, 5], [6, 7, 8])
    pattern = []
    for step, L in enumerate(range(33, 41)):
        if step % 2:
            p = st.plan(both, torch.tensor([L, 20 + step]), torch.tensor([0, 1]))
        else:
            p = st.plan(a, torch.tensor([L]), torch.tensor([0]))
        pattern.append(bool(p.refresh[0]))
    assert pattern == [True, False, False, False] * 2


def test_dense_below_threshold_skips_masks():
    st = make(dense_below=64)
    p = st.plan(table([3, 4, 5, 6, 7], [2, 9, 10, 11, 12]), torch.tensor([64, 65]), torch.tensor([0, 1]))
    assert p.refresh.tolist() == [False, True]
    assert int(p.window_start[0]) == 0
