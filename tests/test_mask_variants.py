"""benchmarks/mask_variants.py (selection variants for quality experiments): the oracle really is the exact
block top-n, and the staged search reduces to it when its stages keep everything."""
import torch

from kernels.reference import hip_mask_reference, make_query_blocks, window_starts
from mask_variants import mask_oracle, mask_staged

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
