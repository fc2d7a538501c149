"""The vectorised torch CPU path (kernels/torch_hip.py) against the reference, on fresh random inputs.

Tolerances (||out - ref|| / ||ref||): fp32 1e-5; bf16 4e-3 (both compute in fp32 from the same inputs, but
the outputs are rounded to bf16, so a different summation order can move an element by one bf16 ulp).
"""
import pytest
import torch

from kernels.reference import hip_attention_reference, hip_mask_reference, make_query_blocks, window_starts
from kernels.torch_hip import hip_attention_torch


def _problem(seq_lens, q_lens, Hq, Hkv, D, page, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    per = max((s + page - 1) // page for s in seq_lens)
    nb = len(seq_lens) * per + 2
    raw = torch.randn(nb, Hkv, page, 2 * D, generator=g).to(dtype)
    kc, vc = raw.transpose(1, 2).split(D, dim=-1)  # vLLM-like strided views
    bt = torch.randperm(nb, generator=g)[: len(seq_lens) * per].view(len(seq_lens), per).to(torch.int32)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(sum(q_lens)), Hq, D, generator=g).to(dtype)
    return q, kc, vc, bt, qsl, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa", [1, 3, 4])
@pytest.mark.parametrize("bk,page", [(1, 16), (4, 16), (2, 128), (32, 16)])
def test_matches_reference_on_ragged_mixed_batches(dtype, gqa, bk, page):
    seq_lens, q_lens = [37, 300, 513, 90, 129], [1, 120, 77, 1, 129]  # decodes, chunked prefill, fresh prefill
    Hkv, D = 2, 32
    q, kc, vc, bt, qsl, seq = _problem(seq_lens, q_lens, Hkv * gqa, Hkv, D, page, dtype, seed=bk * page + gqa)
    qb = make_query_blocks(qsl, seq, 16)
    ws = window_starts(qb[3], 40, bk)
    ws[1] = 0  # one dense block among sparse ones
    sink = 2 * bk
    idx = hip_mask_reference(q, kc, bt, *qb[:3], ws, n_select=4, block_size_q=16, block_size_k=bk,
                             sink_tokens=sink, query_stride=2)
    ref = hip_attention_reference(q, kc, vc, bt, seq, *qb, ws, idx, sink_tokens=sink, block_size_k=bk, scale=0.3)
    out = torch.full_like(q, float("nan"))
    hip_attention_torch(q, kc, vc, bt, seq, *qb, ws, idx, sink_tokens=sink, block_size_k=bk, scale=0.3, out=out,
                        max_keys_per_chunk=4096)  # small chunks: exercise the chunking
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert torch.isfinite(out).all() and err < (1e-5 if dtype == torch.float32 else 4e-3)


def test_indices_row_and_inert_blocks():
    q, kc, vc, bt, qsl, seq = _problem([200, 150, 90], [1, 1, 1], 4, 2, 32, 16, torch.float32, seed=5)
    qb = list(make_query_blocks(qsl, seq, 16))
    ws = window_starts(qb[3], 32, 4)
    cache = torch.full((8, 2, 6), -1, dtype=torch.int32)
    rows = torch.tensor([5, 0, 3], dtype=torch.int32)
    cache[rows.long()] = hip_mask_reference(q, kc, bt, *qb[:3], ws, n_select=6, block_size_q=16,
                                            block_size_k=4, sink_tokens=8, query_stride=1)
    ref = hip_attention_reference(q, kc, vc, bt, seq, *qb, ws, cache[rows.long()], sink_tokens=8,
                                  block_size_k=4, scale=0.2)
    qb[2] = torch.tensor([1, 0, 1], dtype=torch.int32)  # block 1 inert: its row stays untouched
    out = torch.full_like(q, float("nan"))
    hip_attention_torch(q, kc, vc, bt, seq, *qb, ws, cache, sink_tokens=8, block_size_k=4, scale=0.2, out=out,
                        indices_row=rows)
    assert torch.isnan(out[1]).all()
    assert torch.allclose(out[[0, 2]], ref[[0, 2]], atol=1e-6, rtol=1e-5)


def test_dense_layer_call_with_shared_empty_mask_row():
    """Dense layers pass one shared all -1 mask row ([1, Hkv, 1]) for every block and window_start 0."""
    q, kc, vc, bt, qsl, seq = _problem([300, 90], [120, 1], 4, 2, 32, 128, torch.bfloat16, seed=7)
    qb = make_query_blocks(qsl, seq, 64)
    zeros = torch.zeros_like(qb[0])
    no_idx = torch.full((1, 2, 1), -1, dtype=torch.int32)
    ref = hip_attention_reference(q, kc, vc, bt, seq, *qb, zeros, no_idx[zeros.long()], sink_tokens=16,
                                  block_size_k=2, scale=0.2)
    out = torch.full_like(q, float("nan"))
    hip_attention_torch(q, kc, vc, bt, seq, *qb, zeros, no_idx, sink_tokens=16, block_size_k=2, scale=0.2,
                        out=out, indices_row=zeros)
    err = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert err < 4e-3
