"""benchmarks/mask_variants.py (selection variants for quality experiments): the oracle really is the exact
block top-n, the staged search reduces to it when its stages keep everything, and the normalised score lets a quiet
head's needle through where the raw score lets a loud head of the same KV group take every slot."""
import torch

from kernels.reference import hip_mask_reference, make_query_blocks, window_starts
from mask_variants import mask_oracle, mask_oracle_norm, mask_staged, mask_summary, mask_v3_norm

KW = dict(n_select=8, block_size_q=32, block_size_k=4, sink_tokens=8, query_stride=1)


def _problem(L=1024, Hq=4, Hkv=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, Hq, D, generator=g)
    k = torch.randn(1, L, Hkv, D, generator=g)
    qb = make_query_blocks(torch.tensor([0, L]), torch.tensor([L]), KW["block_size_q"])
    return q, k, torch.zeros(1, 1, dtype=torch.int32), qb, window_starts(qb[3], 64, KW["block_size_k"])


def test_oracle_finds_planted_blocks():
    q, k, bt, qb, ws = _problem()
    last = q[-32:].view(32, 2, 2, 16).sum((0, 2))  # one direction per KV head that the last block's queries like
    needles = [37, 101, 180]  # key blocks (of 4 tokens) far outside the window
    for b in needles:
        k[0, b * 4: b * 4 + 4] = 20 * last / last.norm(dim=-1, keepdim=True)
    sel = mask_oracle(q, k, bt, *qb[:3], ws, **KW)[-1]
    for h in range(2):
        assert set(needles) <= set(sel[h].tolist())


def test_staged_keeping_everything_is_the_oracle():
    q, k, bt, qb, ws = _problem(seed=1)
    want = mask_oracle(q, k, bt, *qb[:3], ws, **KW)
    got = mask_staged(q, k, bt, *qb[:3], ws, stages=((64, 1 << 20), (16, 1 << 20)), **KW)
    assert torch.equal(got, want)
    pruned = mask_staged(q, k, bt, *qb[:3], ws, stages=((64, 128), (16, 64)), **KW)
    assert not torch.equal(pruned, want)  # real stages prune: the test above is not vacuous


def test_few_candidates_select_all_like_the_reference():
    q, k, bt, qb, ws = _problem(L=96)
    ref = hip_mask_reference(q, k, bt, *qb[:3], ws, **KW)
    got = mask_oracle(q, k, bt, *qb[:3], ws, **KW)
    for r, g_ in zip(ref, got):
        assert set(r.flatten().tolist()) - {-1} == set(g_.flatten().tolist()) - {-1}


def test_normalised_score_keeps_a_quiet_heads_needle():
    """Two query heads share a KV head: head 0 is loud (logits ~10x larger everywhere), head 1 has one key block
    far above everything it attends. The raw-score oracle gives every slot to head 0's noise; the normalised
    score (each head's logits minus its best over sink and window) selects head 1's needle."""
    g = torch.Generator().manual_seed(3)
    L, D = 1024, 16
    a, b = torch.zeros(D), torch.zeros(D)
    a[0], b[1] = 1.0, 1.0  # orthogonal: the loud head does not see the needle
    q = torch.zeros(L, 2, D)
    q[:, 0] = 10 * a
    q[:, 1] = b
    k = torch.randn(1, L, 1, D, generator=g)
    needle = 120  # key block of 4 tokens, far outside the window
    k[0, needle * 4: needle * 4 + 4, 0] = 12 * b
    qb = make_query_blocks(torch.tensor([0, L]), torch.tensor([L]), KW["block_size_q"])
    ws = window_starts(qb[3], 64, KW["block_size_k"])
    bt = torch.zeros(1, 1, dtype=torch.int32)
    raw = mask_oracle(q, k, bt, *qb[:3], ws, **KW)[-1, 0].tolist()
    norm = mask_oracle_norm(q, k, bt, *qb[:3], ws, window=64, **KW)[-1, 0].tolist()
    assert needle not in raw
    assert needle in norm


def test_v3_norm_is_v3_where_the_offset_cannot_reorder():
    """One query row per block and one query head per KV head: the offset is a constant per (block, head), so the
    normalised hierarchical search must pick exactly what the reference picks (the augmented dimension is wired
    right); with a shared KV head (GQA) it may differ."""
    g = torch.Generator().manual_seed(5)
    L, D = 900, 16
    k = torch.randn(1, L, 2, D, generator=g)
    rows = torch.tensor([300, 611, 899], dtype=torch.int32)
    one = torch.ones(3, dtype=torch.int32)
    ws = window_starts(rows, 64, KW["block_size_k"])
    bt = torch.zeros(1, 1, dtype=torch.int32)
    q = torch.randn(L, 2, D, generator=g)
    args = (bt, torch.zeros(3, dtype=torch.int32), rows, one, ws)
    assert torch.equal(mask_v3_norm(q, k, *args, window=64, **KW), hip_mask_reference(q, k, *args, **KW))
    # a loud and a quiet head sharing a KV head: the offset must change the choice (it is not silently dropped)
    q2 = torch.zeros(L, 2, D)
    q2[:, 0, 0], q2[:, 1, 1] = 10.0, 1.0
    k2 = torch.randn(1, L, 1, D, generator=g)
    args2 = (bt, torch.zeros(3, dtype=torch.int32), rows, one, ws)
    assert not torch.equal(mask_v3_norm(q2, k2, *args2, window=64, **KW), hip_mask_reference(q2, k2, *args2, **KW))


def test_exact_stage_is_the_oracle_where_groups_fit_it():
    """hip_mask_reference(exact_blocks=E): where every query block has at most E * n candidates, the search is
    one exact round, so the selection is the true top-n blocks (the oracle), on random problems with GQA, strided
    query rows and query blocks of every size; with E = 1 (plain v3) it is not."""
    for seed in range(3):
        q, k, bt, qb, ws = _problem(L=1024, Hq=8, Hkv=2, seed=10 + seed)
        count = int(ws.max()) // KW["block_size_k"] - KW["sink_tokens"] // KW["block_size_k"]
        E = 1 << (-(-count // KW["n_select"]) - 1).bit_length()  # smallest power of two >= the largest group
        kw = dict(KW, query_stride=2)
        want = mask_oracle(q, k, bt, *qb[:3], ws, **kw)
        assert torch.equal(hip_mask_reference(q, k, bt, *qb[:3], ws, exact_blocks=E, **kw), want)
        assert not torch.equal(hip_mask_reference(q, k, bt, *qb[:3], ws, exact_blocks=1, **kw), want)


def test_reference_normalised_score_equals_the_augmented_dimension_construction():
    """``hip_mask_reference(norm_window=W)`` (the backend's score: logits minus each row's best over sink and the
    window's first W keys) selects what the search selects on ``mask_variants._normalised``'s augmented q and k
    (the offset carried in an extra dimension), for a batch of requests on scattered pages of a larger pool."""
    from mask_variants import _normalised

    g = torch.Generator().manual_seed(1)
    Hq, Hkv, D, page, pool = 6, 2, 16, 16, 48
    k = torch.randn(pool, page, Hkv, D, generator=g)
    bt = torch.stack([torch.randperm(pool, generator=g)[:12] for _ in range(3)]).int()
    q = torch.randn(3, Hq, D, generator=g)
    req, st, ln = torch.tensor([0, 2, 1]), torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.long)
    pos = torch.tensor([12 * page - 1, 11 * page - 5, 10 * page])
    ws = window_starts(pos, 32, 4)
    kw = dict(n_select=4, block_size_q=1, block_size_k=4, sink_tokens=8, query_stride=1, exact_blocks=8)
    got = hip_mask_reference(q, k, bt, req, st, ln, ws, norm_window=32, **kw)
    q2, k2 = _normalised(q, k, bt.long(), req, st, ln, ws, sink_tokens=8, window=32)
    assert torch.equal(got, hip_mask_reference(q2, k2, bt.long(), req, st, ln, ws, **kw))
    assert not torch.equal(got, hip_mask_reference(q, k, bt, req, st, ln, ws, **kw))  # the score did change


def test_summary_of_single_keys_is_the_oracle_and_coarser_summaries_still_find_planted_needles():
    """A unit of one key has max = min = the key, so its bound is q . k and the selection is the oracle's. With
    16-key units the bound is loose, yet a planted needle block lifts its unit's bound above every other's."""
    q, k, bt, qb, ws = _problem(seed=4)
    kw1 = dict(KW, block_size_k=1, n_select=16, sink_tokens=8)
    ws1 = window_starts(qb[3], 64, 1)
    assert torch.equal(mask_summary(q, k, bt, *qb[:3], ws1, summary_tokens=1, **kw1),
                       mask_oracle(q, k, bt, *qb[:3], ws1, **kw1))
    last = q[-32:].view(32, 2, 2, 16).sum((0, 2))
    needles = [37, 101, 180]  # key blocks of 4 tokens; units of 16 tokens hold 4 blocks
    for b in needles:
        k[0, b * 4: b * 4 + 4] = 20 * last / last.norm(dim=-1, keepdim=True)
    kw3 = dict(KW, n_select=12)  # 3 units of 4 blocks: one per needle, nothing to spare
    sel = mask_summary(q, k, bt, *qb[:3], ws, summary_tokens=16, **kw3)[-1]
    for h in range(2):
        assert set(needles) <= set(sel[h].tolist())
        assert (sel[h] >= 0).sum() == 12


def test_summary_selection_follows_the_configs_score():
    from mask_variants import mask_summary_for, mask_summary_norm

    from vllm_hip.config import HipConfig

    assert mask_summary_for(HipConfig(normalised_score=False)) is mask_summary
    norm = mask_summary_for(HipConfig(norm_window=512))
    assert norm.func is mask_summary_norm and norm.keywords == {"window": 512}


def test_shortlist_spans_summary_only_and_the_oracle():
    """The summaries shortlist ``shortlist x n`` blocks and an exact stage keeps the best ``n``: with a shortlist of
    ``n`` it keeps what the summaries alone choose; with one as long as the candidates it is the oracle (exact top-n
    under the block score); in between it keeps more of the oracle's blocks than the summaries alone."""
    q, k, bt, qb, ws = _problem(seed=6)
    kw = dict(KW, n_select=8)
    only = mask_summary(q, k, bt, *qb[:3], ws, summary_tokens=16, **kw)
    assert torch.equal(mask_summary(q, k, bt, *qb[:3], ws, summary_tokens=16, shortlist=1, **kw), only)
    assert torch.equal(mask_summary(q, k, bt, *qb[:3], ws, summary_tokens=16, shortlist=1000, **kw),
                       mask_oracle(q, k, bt, *qb[:3], ws, **kw))
    # in between, the exact stage only upgrades: as many blocks as the summaries keep, and at least as many of the
    # oracle's as they keep
    base = mask_oracle(q, k, bt, *qb[:3], ws, **kw)
    sl = mask_summary(q, k, bt, *qb[:3], ws, summary_tokens=16, shortlist=4, **kw)
    assert not torch.equal(sl, only)
    for b in range(sl.shape[0]):
        for h in range(sl.shape[1]):
            got, was, best = (set(t[b, h].tolist()) - {-1} for t in (sl, only, base))
            assert len(got) == len(was) and len(got & best) >= len(was & best)
