"""FlashAttention's varlen paged contract in plain torch: a CPU stand-in for vLLM's FlashAttention, so CPU tests
can run the backend's FlashAttention paths (the start-up check, and inside the engine)."""
import torch


def reference_fa(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal,
                 block_table, fa_version, num_splits=0, *, use_max_len=False, ignore_table=False):
    """Causal attention aligned to the end of each request's ``seqused_k`` keys; a request with no keys gets
    zeros (as FlashAttention). ``num_splits`` changes only how FlashAttention-3 divides the work (FA2 refuses more
    than 1). ``use_max_len`` / ``ignore_table``: deliberately wrong variants for the tests."""
    assert causal
    assert isinstance(num_splits, int) and num_splits >= 0 and (fa_version == 3 or num_splits <= 1), num_splits
    hkv, d = k.shape[2], k.shape[3]
    for r in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[r]), int(cu_seqlens_q[r + 1])
        n = q1 - q0
        # FlashAttention's contract: it sizes its grid from max_seqlen_k and reads no key past it
        assert int(seqused_k[r]) <= int(max_seqlen_k), f"seqused_k {int(seqused_k[r])} > max_seqlen_k {max_seqlen_k}"
        L = min(int(max_seqlen_k), block_table.shape[1] * k.shape[1]) if use_max_len else int(seqused_k[r])
        if L == 0:
            out[q0:q1] = 0
            continue
        pages = torch.arange(block_table.shape[1]) if ignore_table else block_table[r].long()
        keys = k[pages].reshape(-1, hkv, d)[:L].float()
        vals = v[pages].reshape(-1, hkv, d)[:L].float()
        g = q.shape[1] // hkv
        keys, vals = keys.repeat_interleave(g, 1), vals.repeat_interleave(g, 1)
        s = torch.einsum("nhd,lhd->hnl", q[q0:q1].float(), keys) * softmax_scale
        pos = torch.arange(n)[:, None] + (L - n)
        s = s.masked_fill(torch.arange(L)[None, :] > pos, float("-inf"))
        out[q0:q1] = torch.einsum("hnl,lhd->nhd", s.softmax(-1), vals).to(out.dtype)
