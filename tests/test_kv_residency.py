"""KV residency (offload tiers): permutation invariants, nothing lost, LRU policy, translation, statistics."""
import pytest
import torch

from vllm_hip.kv_residency import KVResidency

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_tiers(N, G, device, gen):
    """(device, host) tier pairs of several trailing shapes/dtypes, incl. K/V as views of one tensor."""
    specs = [((4, 2, 3), torch.float32), ((5,), torch.bfloat16), ((), torch.int64), ((2, 3), torch.float16)]
    pairs = []
    for shape, dtype in specs:
        full = torch.randn((N,) + shape, generator=gen) * 100
        full = full.to(dtype)
        pairs.append((full[:G].clone().to(device), full[G:].clone().to(device)))
    # One layer's K and V as views of a single [2, pages, ...] tensor per tier.
    kv = (torch.randn((2, N, 3, 2), generator=gen)).to(device)
    kv_dev, kv_host = kv[:, :G].clone(), kv[:, G:].clone()
    pairs += [(kv_dev[0], kv_host[0]), (kv_dev[1], kv_host[1])]
    return pairs


def virtual(res, dev_t, host_t):
    """Each logical page's contents, read from whichever tier ``loc`` says it lives in."""
    return torch.cat([dev_t, host_t])[res.loc.long()]


def set_last_used(res, stamps):
    """Touch pages so that last_used[p] == stamps[p] (-1: never touched), through touch/advance only."""
    for s in range(max(stamps.values()) + 1):
        pages = [p for p, t in stamps.items() if t == s]
        if pages:
            res.touch(torch.tensor(pages, device=res.device))
        res.advance()
    expect = torch.full((res.num_pages,), -1, dtype=torch.int64)
    for p, t in stamps.items():
        expect[p] = t
    assert torch.equal(res.last_used.cpu(), expect)


def device_resident(res):
    return set(torch.nonzero(res.loc.cpu() < res.num_device_pages).flatten().tolist())


# --------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,G,moves", [(37, 11, 5), (20, 15, 8), (16, 4, 16), (9, 9, 3), (9, 0, 3)])
@pytest.mark.parametrize("writes", [0, 4], ids=["lru", "lru+writes"])
def test_random_rounds_keep_permutation_and_contents(device, N, G, moves, writes):
    gen = torch.Generator().manual_seed(N * 100 + G)
    res = KVResidency(N, G, device, max_moves=moves, max_write_moves=writes)
    tiers = make_tiers(N, G, device, gen)
    before = [virtual(res, d, h).clone() for d, h in tiers]
    # A tier whose contents are the logical page ids: counts every page (nothing lost, nothing duplicated).
    ids = torch.arange(N, device=device)
    id_tiers = (ids[:G].clone(), ids[G:].clone())
    moved = 0
    for _ in range(30):
        shape = (int(torch.randint(1, 4, (), generator=gen)), int(torch.randint(1, 12, (), generator=gen)))
        pages = torch.randint(-2, N, shape, generator=gen)
        valid = torch.rand(shape, generator=gen) < 0.7
        res.advance()
        res.touch(pages.to(device), valid.to(device))
        if writes:
            res.touch_slots(torch.randint(-3, 4 * N, (int(torch.randint(0, 9, (), generator=gen)),),
                                          generator=gen).to(device), 4)
        loc_before = res.loc.clone()
        res.rebalance(tiers + [id_tiers])
        res.check()
        assert (res.loc < G).sum().item() == G  # the device tier never holds more than G pages
        n_changed = int((res.loc != loc_before).sum())
        moved_now = res.read_stats()["pages_moved"] - moved
        assert moved_now == n_changed and moved_now <= 2 * min(moves + writes, G, N - G)
        moved += moved_now
        for (d, h), b in zip(tiers, before):
            assert torch.equal(virtual(res, d, h), b)
        stored = torch.cat(id_tiers)  # physical page -> logical page stored there
        assert torch.equal(torch.sort(stored).values.cpu(), torch.arange(N))
        assert torch.equal(stored, res.owner.long())
    if 0 < G < N:
        assert moved > 0  # the random pattern did exercise swaps


def test_virtual_contents_survive_reuse_by_a_new_owner():
    """vLLM reuses a freed logical page wherever it lives: writing through the physical slot is enough."""
    N, G, P = 8, 3, 4
    res = KVResidency(N, G, "cpu", max_moves=2)
    dev, host = torch.zeros(G, P), torch.zeros(N - G, P)
    flat = lambda: torch.cat([dev, host]).view(-1)  # noqa: E731
    set_last_used(res, {6: 0, 7: 1})
    res.rebalance([(dev, host)])
    res.check()
    slots = torch.arange(N * P)  # write every logical slot its own id, through the translation
    phys = res.translate_slots(slots, P)
    buf = flat()
    buf[phys] = slots.float()
    dev.copy_(buf[: G * P].view(G, P))
    host.copy_(buf[G * P:].view(N - G, P))
    assert torch.equal(virtual(res, dev, host).view(-1), slots.float())


# --------------------------------------------------------------------------------------------------- policy
@pytest.mark.parametrize("device", DEVICES)
def test_lru_promotes_hottest_host_pages_and_evicts_coldest_device_pages(device):
    N, G = 10, 4
    res = KVResidency(N, G, device, max_moves=2)
    # device: 0..3, host: 4..9.   hottest host: 9 (7), 5 (6).   coldest device: 3 (never), 1 (1).
    set_last_used(res, {0: 5, 1: 1, 2: 3, 4: 2, 5: 6, 6: 0, 7: 4, 9: 7})
    dev = torch.arange(G, dtype=torch.float32, device=device)
    host = torch.arange(G, N, dtype=torch.float32, device=device)
    res.rebalance([(dev, host)])
    res.check()
    assert device_resident(res) == {0, 2, 5, 9}
    loc = res.loc.tolist()
    # The i-th promotion pairs with the i-th victim: 9 takes 3's device page and 5 takes 1's, and vice versa.
    assert (loc[9], loc[5], loc[3], loc[1]) == (3, 1, 9, 5)
    assert torch.equal(virtual(res, dev, host), torch.arange(N, dtype=torch.float32, device=device))
    assert res.read_stats()["pages_moved"] == 4


@pytest.mark.parametrize("device", DEVICES)
def test_pages_written_now_move_in_first_on_top_of_max_moves(device):
    """A prefill chunk written to host pages moves to the GPU in the same step (its own later chunks read it),
    beyond max_moves; other hot host pages keep the max_moves budget; device pages used now stay."""
    N, G, P = 16, 6, 4
    res = KVResidency(N, G, device, max_moves=1, max_write_moves=3)
    set_last_used(res, {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 4, 8: 3, 9: 2})  # device 0..5, host 6..15; step is now 5
    res.touch(torch.tensor([4, 10, 11], device=device))  # used now: device page 4, host pages 10 and 11
    res.touch_slots(torch.tensor([12 * P, 12 * P + 1, 13 * P + 3, 14 * P, -1], device=device), P)  # writes 12-14
    dev = torch.arange(G, dtype=torch.float32, device=device)
    host = torch.arange(G, N, dtype=torch.float32, device=device)
    res.rebalance([(dev, host)])
    res.check()
    assert torch.equal(virtual(res, dev, host), torch.arange(N, dtype=torch.float32, device=device))
    # written 12, 13, 14 in; then one (max_moves) of the used-now pages 10 / 11; out: the four coldest 0-3
    resident = device_resident(res)
    assert {12, 13, 14, 4, 5} <= resident and len(resident & {10, 11}) == 1, resident
    assert res.read_stats()["pages_moved"] == 8
    # without the write budget the written pages wait their turn among the other recently used pages
    plain = KVResidency(N, G, device, max_moves=1)
    set_last_used(plain, {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 4, 8: 3, 9: 2})
    plain.touch_slots(torch.tensor([12 * P, 13 * P, 14 * P], device=device), P)
    plain.rebalance([(dev.clone(), host.clone())])
    assert len(device_resident(plain) & {12, 13, 14}) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_written_pages_never_displace_device_pages_used_now(device):
    N, G, P = 8, 2, 4
    res = KVResidency(N, G, device, max_moves=0, max_write_moves=4)
    res.advance()
    res.touch(torch.tensor([0, 1], device=device))  # both device pages read at this step
    res.touch_slots(torch.tensor([5 * P, 6 * P], device=device), P)
    res.rebalance([(torch.zeros(G, device=device), torch.zeros(N - G, device=device))])
    assert device_resident(res) == {0, 1} and res.read_stats()["pages_moved"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_ties_and_colder_candidates_do_not_swap(device):
    N, G = 10, 4
    res = KVResidency(N, G, device, max_moves=4)
    # promotions (hottest first): 9 (7), 5 (6), 7 (5), 4 (2); victims (coldest first): 1 (1), 2 (4), 0 (5), 3 (8).
    # Pairs: 9 > 1 and 5 > 2 swap; 7 ties 0 and 4 is colder than 3, so those two pairs stay put.
    set_last_used(res, {0: 5, 1: 1, 2: 4, 3: 8, 4: 2, 5: 6, 6: 0, 7: 5, 8: 0, 9: 7})
    res.rebalance([])
    res.check()
    assert device_resident(res) == {0, 3, 5, 9}
    assert res.read_stats()["pages_moved"] == 4

    tie = KVResidency(N, G, device, max_moves=4)
    set_last_used(tie, {p: 3 for p in range(N)})  # everything equally recent
    tie.rebalance([])
    assert torch.equal(tie.loc.cpu(), torch.arange(N, dtype=torch.int32))
    assert tie.read_stats()["pages_moved"] == 0

    tie2 = KVResidency(N, G, device, max_moves=4)
    set_last_used(tie2, {0: 2, 1: 2, 2: 2, 3: 2, 7: 2, 8: 1})  # the hottest host page ties the coldest device page
    tie2.rebalance([])
    assert tie2.read_stats()["pages_moved"] == 0 and device_resident(tie2) == {0, 1, 2, 3}


@pytest.mark.parametrize("device", DEVICES)
def test_no_op_when_nothing_on_host_is_hotter(device):
    N, G = 12, 5
    gen = torch.Generator().manual_seed(1)
    for stamps in ({}, {**{p: 0 for p in range(G, N)}, **{p: 1 + p for p in range(G)}}):
        res = KVResidency(N, G, device, max_moves=3)
        if stamps:
            set_last_used(res, stamps)
        tiers = make_tiers(N, G, device, gen)
        raw = [(d.clone(), h.clone()) for d, h in tiers]
        res.rebalance(tiers)
        assert torch.equal(res.loc.cpu(), torch.arange(N, dtype=torch.int32))
        assert torch.equal(res.owner.cpu(), torch.arange(N, dtype=torch.int32))
        for (d, h), (d0, h0) in zip(tiers, raw):
            assert torch.equal(d, d0) and torch.equal(h, h0)
        assert res.read_stats()["pages_moved"] == 0


def test_degenerate_tiers_and_bad_arguments():
    for N, G, m in [(5, 5, 3), (5, 0, 3), (5, 2, 0)]:
        res = KVResidency(N, G, "cpu", max_moves=m)
        assert res.k == 0
        res.touch(torch.arange(N))
        res.advance()
        res.rebalance([(torch.zeros(G, 2), torch.zeros(N - G, 2))])
        assert torch.equal(res.loc, torch.arange(N, dtype=torch.int32))
    with pytest.raises(ValueError):
        KVResidency(4, 5, "cpu", max_moves=1)
    with pytest.raises(ValueError):
        KVResidency(4, 2, "cpu", max_moves=-1)


# ---------------------------------------------------------------------------------------------- translation
@pytest.mark.parametrize("device", DEVICES)
def test_translate_block_table_and_slots(device):
    N, G, P = 16, 6, 4
    res = KVResidency(N, G, device, max_moves=4)
    set_last_used(res, {12: 3, 13: 2, 14: 1, 15: 0, 0: 0})
    res.rebalance([])
    res.check()
    loc = res.loc.tolist()
    assert loc != list(range(N))
    for dtype in (torch.int32, torch.int64):
        bt = torch.tensor([[12, 0, 5, -1, -1], [15, 14, 13, 3, 0], [-1, -1, -1, -1, -1]], dtype=dtype)
        out = res.translate_block_table(bt.to(device))
        assert out.dtype == dtype and out.shape == bt.shape
        expect = [[loc[b] if b >= 0 else b for b in row] for row in bt.tolist()]
        assert out.tolist() == expect
    slots = torch.tensor([0, 3, 4, 49, 50, 63, -1, -1, 12 * P + 2], dtype=torch.int64)
    out = res.translate_slots(slots.to(device), P)
    expect = [loc[s // P] * P + s % P if s >= 0 else s for s in slots.tolist()]
    assert out.tolist() == expect and out.dtype == torch.int64
    out32 = res.translate_slots(slots.to(torch.int32).to(device), P)
    assert out32.dtype == torch.int32 and out32.tolist() == expect


# ---------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("device", DEVICES)
def test_hit_statistics(device):
    N, G = 10, 4
    res = KVResidency(N, G, device, max_moves=2)
    st = res.read_stats()
    assert st["lookups"] == 0 and st["hit_rate"] == 0.0
    # device 0..3: pages 1, 3, 3 hit; 7, 8 miss; -1 padding and the invalid 2 are not lookups.
    pages = torch.tensor([[1, 3, 7, -1], [3, 8, 2, -1]], device=device)
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]], device=device)
    res.touch(pages, valid)
    st = res.read_stats(bytes_per_page=1000)
    assert (st["hits"], st["lookups"]) == (3, 5) and st["hit_rate"] == pytest.approx(0.6)
    assert (st["device_pages"], st["host_pages"], st["pages_moved"], st["bytes_moved"]) == (4, 6, 0, 0)
    assert res.last_used[2].item() == -1  # the invalid entry left no trace
    res.advance()
    res.touch(torch.tensor([7, 8], device=device))  # promote 7 and 8 over never-used 0 and 2
    res.advance()
    res.rebalance([])
    assert device_resident(res) == {1, 3, 7, 8}
    res.touch(torch.tensor([7, 8, 0], device=device))
    st = res.read_stats(bytes_per_page=1000, reset=True)
    assert (st["hits"], st["lookups"], st["pages_moved"], st["bytes_moved"]) == (5, 10, 4, 4000)
    st = res.read_stats()
    assert (st["hits"], st["lookups"], st["pages_moved"]) == (0, 0, 0)
    # selection-cache fills: whole searches of decode requests, counted without a sync
    res.count_cache_fills(torch.tensor([True, False, True], device=device))
    res.count_cache_fills(torch.tensor([True], device=device))
    st = res.read_stats(bytes_per_fill=100, reset=True)
    assert (st["cache_fills"], st["cache_bytes_filled"], st["lookups"]) == (3, 300, 0)
    assert res.read_stats()["cache_fills"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_stats_async_returns_an_earlier_snapshot(device):
    res = KVResidency(8, 4, device, max_moves=2)
    assert res.stats_async()["lookups"] == 0
    res.touch(torch.tensor([0, 1, 5], device=device))
    if device == "cuda":
        torch.cuda.synchronize()
    assert res.stats_async()["lookups"] == 0  # the copy made at the first call
    if device == "cuda":
        torch.cuda.synchronize()
    st = res.stats_async(bytes_per_page=8)
    assert (st["hits"], st["lookups"]) == (2, 3)


def test_touch_slots():
    res = KVResidency(8, 2, "cpu", max_moves=2)
    res.advance()
    res.touch_slots(torch.tensor([-1, 17, 18, 5, -1]), 4)
    assert res.last_used.tolist() == [-1, 1, -1, -1, 1, -1, -1, -1]


# ---------------------------------------------------------------------------------------------- simulation
@pytest.mark.parametrize("noise", [0, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_hot_set_migrates_to_device(device, noise):
    """A request's hot pages start on the host; after a few rebalances every lookup hits the device tier."""
    N, G, P, moves = 64, 16, 4, 3
    gen = torch.Generator().manual_seed(7)
    res = KVResidency(N, G, device, max_moves=moves)
    tiers = make_tiers(N, G, device, gen)
    before = [virtual(res, d, h).clone() for d, h in tiers]
    hot = torch.tensor([40, 41, 45, 50, 51, 63, 33], device=device)  # e.g. sinks + top-k picks + window
    res.touch(torch.arange(G, device=device))  # the device tier starts warm with other pages
    res.advance()
    rates = []
    for step in range(12):
        # Each step: translate (what kernels would see), use the hot set, write, then rebalance for the next.
        bt = res.translate_block_table(hot.view(1, -1))
        assert bt.shape == (1, hot.numel())
        res.read_stats(reset=True)
        res.touch(hot)
        rates.append(res.read_stats()["hit_rate"])
        res.touch(torch.randint(0, N, (noise,), generator=gen).to(device))  # a little unrelated traffic
        res.advance()
        res.rebalance(tiers)
        res.check()
        assert (res.loc < G).sum().item() == G
    assert rates[0] == 0.0
    assert rates == sorted(rates) and rates[-1] == 1.0
    # Alone, ceil(hot / moves) rebalances suffice. Unrelated pages touched in the same step compete for the
    # promotions (equally recent) but never evict the hot set: at least moves - noise hot pages arrive per step.
    assert rates.index(1.0) <= -(-hot.numel() // (moves - noise))
    assert set(hot.tolist()) <= device_resident(res)
    for (d, h), b in zip(tiers, before):
        assert torch.equal(virtual(res, d, h), b)


# ------------------------------------------------------------------------------------------ no host sync
def test_per_step_methods_have_static_shapes():
    """On the meta device any .item(), .tolist(), nonzero() or boolean-mask indexing raises."""
    N, G = 32, 8
    res = KVResidency(N, G, "meta", max_moves=4)
    tiers = [(torch.empty(G, 2, 3, device="meta"), torch.empty(N - G, 2, 3, device="meta"))]
    bt = res.translate_block_table(torch.empty(3, 5, dtype=torch.int32, device="meta"))
    assert bt.shape == (3, 5) and bt.dtype == torch.int32
    assert res.translate_slots(torch.empty(7, dtype=torch.int64, device="meta"), 16).shape == (7,)
    meta = dict(device="meta")
    res.touch(torch.empty(3, 5, dtype=torch.int64, **meta), torch.empty(3, 5, dtype=torch.bool, **meta))
    res.touch(torch.empty(4, dtype=torch.int32, device="meta"))
    res.touch_slots(torch.empty(4, dtype=torch.int64, device="meta"), 16)
    res.advance()
    res.rebalance(tiers)


@cuda_only
def test_cuda_no_sync_and_graph_capture():
    N, G, P = 64, 16, 4
    res = KVResidency(N, G, "cuda", max_moves=4)
    gen = torch.Generator().manual_seed(3)
    tiers = make_tiers(N, G, "cuda", gen)
    before = [virtual(res, d, h).clone() for d, h in tiers]
    pages = torch.zeros(2, 8, dtype=torch.int64, device="cuda")
    valid = torch.ones(2, 8, dtype=torch.bool, device="cuda")
    slots = torch.zeros(5, dtype=torch.int64, device="cuda")
    bt = torch.zeros(2, 8, dtype=torch.int32, device="cuda")

    def step():
        res.translate_block_table(bt)
        res.translate_slots(slots, P)
        res.touch(pages, valid)
        res.touch_slots(slots, P)
        res.advance()
        res.rebalance(tiers)

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up on a side stream before capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for i in range(10):
        pages.copy_(torch.randint(0, N, (2, 8), generator=gen))
        valid.copy_(torch.rand(2, 8, generator=gen) < 0.8)
        slots.copy_(torch.randint(-1, N * P, (5,), generator=gen))
        graph.replay()
        res.check()
        for (d, h), b in zip(tiers, before):
            assert torch.equal(virtual(res, d, h), b)
    assert res.read_stats()["pages_moved"] > 0
