"""Mask-selection variants for quality experiments (torch, CPU): drop-in replacements of
``kernels.reference.hip_mask_reference`` with the same arguments and output, used by ``bench_mask_variants.py``.

* ``oracle``: the exact top-n key blocks under HiP's own block score (max of q.k over the block's scored
  queries, the KV group's heads and the block's keys): the best any block selection with the same budget can do.
* ``staged``: an InfiniteHiP-style staged search (hip.md, "InfiniteHiP refinements", in our words): the
  candidates are cut into chunks of ``C`` tokens, each chunk is scored by a top-1 probe (halve the chunk
  ``log2(C / bk)`` times, each time keeping the half whose centre key block scores higher; the chunk's score is
  the score of the block reached), the best chunks covering ``keep`` tokens survive; the next stage does the same
  with smaller chunks inside the survivors; finally every key block of the survivors is scored and the best n kept.

* ``summary`` (and ``summary_norm``): selection from per-page key summaries only, the kind a KV offload could keep
  on the GPU while the keys themselves live in host memory. Each unit of ``summary_tokens`` keys (a vLLM page) is
  summarised by its per-dimension max and min key (Quest's bound: ``sum_d max(q_d max_d, q_d min_d) >= q . k``
  for every key of the unit); the units with the best bound (max over the scored queries and the group's heads)
  are taken whole until ``n`` key blocks are chosen. Reads 2 vectors per unit instead of its keys.
* ``shortlist``: the summaries shortlist ``shortlist x n`` key blocks (whole units, best bound first), then an
  exact stage scores each shortlisted block by its own keys (HiP's block score) and keeps the best ``n``. What a KV
  offload could run with summaries on the GPU and only the shortlisted keys read from host memory.

These are evaluation tools, not product kernels: they score every candidate key of every query block (quadratic
on purpose, so each algorithm's choice is compared on identical block scores).
"""
from __future__ import annotations

import torch

from kernels.reference import hip_mask_reference, strided_query_rows

NEG_INF = float("-inf")


def _block_scores(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, block_size_q, block_size_k,
                  sink_tokens, query_stride):
    """Per query block: ``(begin, count, scores [Hkv, count])`` of the candidate key blocks (HiP's block score)."""
    bk = block_size_k
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    page = k_cache.shape[1]
    rows, rvalid = strided_query_rows(qb_start, qb_len, block_size_q, query_stride)
    out = []
    for b in range(qb_req.shape[0]):
        begin, end = sink_tokens // bk, int(window_start[b]) // bk
        count = max(0, end - begin)
        if count == 0:
            out.append((begin, 0, None))
            continue
        pos = torch.arange(begin * bk, end * bk)
        phys = block_table[int(qb_req[b])].long()[pos // page]
        keys = k_cache[phys, pos % page].float()  # [P, Hkv, D]
        r = rows[b][rvalid[b]]
        qs = q[r].float().view(-1, Hkv, G, D)  # [NQ, Hkv, G, D]
        s = torch.einsum("nhgd,phd->hpng", qs, keys).flatten(2).amax(-1)  # [Hkv, P]
        out.append((begin, count, s.view(Hkv, count, bk).amax(-1)))
    return out


def _finish(out, b, begin, chosen, n):
    chosen = torch.sort(chosen, dim=-1).values
    out[b, :, : chosen.shape[1]] = (chosen + begin).to(torch.int32)


def mask_oracle(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, n_select, block_size_q,
                block_size_k, sink_tokens, query_stride=1):
    QB, Hkv = qb_req.shape[0], k_cache.shape[2]
    out = torch.full((QB, Hkv, n_select), -1, dtype=torch.int32)
    for b, (begin, count, s) in enumerate(_block_scores(
            q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, block_size_q=block_size_q,
            block_size_k=block_size_k, sink_tokens=sink_tokens, query_stride=query_stride)):
        if count:
            _finish(out, b, begin, torch.topk(s, min(n_select, count), dim=-1).indices, n_select)
    return out


def _probe(s: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Top-1 probe of the block ranges ``[lo, hi)`` (``[H, C]`` each) of scores ``s [H, count]``: halve each
    range, keep the half whose centre block scores higher, until one block is left; returns its score."""
    lo, hi = lo.clone(), hi.clone()
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        left = s.gather(1, (lo + mid - 1) // 2)
        right = s.gather(1, (mid + hi - 1) // 2)
        split = hi - lo > 1
        go_left = left >= right
        lo = torch.where(split & ~go_left, mid, lo)
        hi = torch.where(split & go_left, mid, hi)
    return s.gather(1, lo)


def mask_staged(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, n_select, block_size_q,
                block_size_k, sink_tokens, query_stride=1, stages=((256, 8192), (32, 2048))):
    """``stages``: ``(chunk_tokens, keep_tokens)`` per stage, coarse to fine."""
    bk = block_size_k
    QB, Hkv = qb_req.shape[0], k_cache.shape[2]
    out = torch.full((QB, Hkv, n_select), -1, dtype=torch.int32)
    for b, (begin, count, s) in enumerate(_block_scores(
            q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, block_size_q=block_size_q,
            block_size_k=bk, sink_tokens=sink_tokens, query_stride=query_stride)):
        if not count:
            continue
        # alive[h, j]: block j still a candidate for head h
        alive = torch.ones(Hkv, count, dtype=torch.bool)
        for chunk_tokens, keep_tokens in stages:
            cb = max(1, chunk_tokens // bk)
            n_chunks = -(-count // cb)
            keep = max(1, keep_tokens // chunk_tokens)
            if n_chunks <= keep:
                continue
            masked = s.masked_fill(~alive, NEG_INF)
            lo = (torch.arange(n_chunks) * cb)[None].expand(Hkv, -1)
            hi = torch.clamp(lo + cb, max=count)
            scores = _probe(masked, lo, hi)
            pad = torch.zeros(Hkv, n_chunks * cb, dtype=torch.bool)
            pad[:, :count] = alive
            scores = scores.masked_fill(~pad.view(Hkv, n_chunks, cb).any(-1), NEG_INF)
            best = torch.topk(scores, keep, dim=-1).indices  # [Hkv, keep]
            chunk_ok = torch.zeros(Hkv, n_chunks, dtype=torch.bool).scatter_(1, best, True)
            alive &= chunk_ok.repeat_interleave(cb, 1)[:, :count]
        final = s.masked_fill(~alive, NEG_INF)
        m = min(n_select, count)
        top = torch.topk(final, m, dim=-1)
        chosen = torch.where(torch.isfinite(top.values), top.indices, torch.full_like(top.indices, -1 - begin))
        _finish(out, b, begin, chosen, n_select)
    return out


def _normalised(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, sink_tokens, window):
    """``(q', k')`` with ``q'.k' = q.k - m``: ``m`` per (query row, head) is that head's best logit over the keys
    its block always attends (sink, and the ``window`` keys from the window start, capped at the cache's end).
    The offset rides in one extra dimension, ``[q, -m] . [k, 1]``, so any selection runs on it unchanged."""
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    page = k_cache.shape[1]
    total = block_table.shape[1] * page
    m = torch.zeros(q.shape[0], Hq)
    for b in range(qb_req.shape[0]):
        ws, s, ln = int(window_start[b]), int(qb_start[b]), int(qb_len[b])
        ref_pos = torch.cat([torch.arange(min(sink_tokens, ws)), torch.arange(ws, min(ws + window, total))])
        bt = block_table[int(qb_req[b])].long()
        keys = k_cache[bt[ref_pos // page], ref_pos % page].float()  # [P, Hkv, D]
        qq = q[s: s + ln].float().view(ln, Hkv, G, D)
        m[s: s + ln] = torch.einsum("nhgd,phd->nhgp", qq, keys).amax(-1).reshape(ln, Hq)
    q_aug = torch.cat([q.float(), -m[..., None]], -1)
    k_aug = torch.cat([k_cache.float(), torch.ones(*k_cache.shape[:-1], 1)], -1)
    return q_aug, k_aug


def mask_oracle_norm(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, window=1024, **kw):
    """Exact top-n key blocks under a per-head *normalised* score (``_normalised``), so a head whose best
    candidates sit far below what it already attends does not crowd out a head of its KV group that needs one.
    An experiment on the score, not a product kernel."""
    q2, k2 = _normalised(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start,
                         sink_tokens=kw["sink_tokens"], window=window)
    return mask_oracle(q2, k2, block_table, qb_req, qb_start, qb_len, window_start, **kw)


def mask_v3_norm(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, window=1024, **kw):
    """Our hierarchical search (``hip_mask_reference``) on the normalised score of ``mask_oracle_norm``."""
    q2, k2 = _normalised(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start,
                         sink_tokens=kw["sink_tokens"], window=window)
    return hip_mask_reference(q2, k2, block_table, qb_req, qb_start, qb_len, window_start, **kw)


def mask_summary(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, n_select, block_size_q,
                 block_size_k, sink_tokens, query_stride=1, summary_tokens=16, shortlist: float = 0):
    """Key blocks chosen from per-unit (``summary_tokens`` keys, aligned to positions) max/min key summaries, best
    bound first, whole units, ``n_select`` blocks at most (module docstring). ``shortlist`` > 0: the summaries pick
    ``shortlist x n_select`` blocks instead, and the ``n_select`` best of them by their exact block score (ties:
    lower position first) are kept. Same arguments and output as ``hip_mask_reference``."""
    bk = block_size_k
    per = max(1, summary_tokens // bk)
    st = per * bk
    Hq, D = q.shape[1], q.shape[2]
    QB, Hkv, page = qb_req.shape[0], k_cache.shape[2], k_cache.shape[1]
    G = Hq // Hkv
    rows, rvalid = strided_query_rows(qb_start, qb_len, block_size_q, query_stride)
    out = torch.full((QB, Hkv, n_select), -1, dtype=torch.int32)
    width = block_table.shape[1]
    for b in range(QB):
        begin, end = sink_tokens // bk, int(window_start[b]) // bk
        count = max(0, end - begin)
        if count == 0:
            continue
        if count <= n_select:
            out[b, :, :count] = torch.arange(begin, end, dtype=torch.int32)
            continue
        u0, u1 = begin // per, -(-end // per)
        pos = torch.arange(u0 * st, u1 * st)
        valid = (pos >= begin * bk) & (pos < end * bk)
        phys = block_table[int(qb_req[b])].long()[torch.clamp(pos // page, max=width - 1)]
        keys = k_cache[phys, pos % page].float()  # [P, Hkv, D]
        v = valid[:, None, None]
        kmax = keys.masked_fill(~v, NEG_INF).view(-1, st, Hkv, D).amax(1)  # [U, Hkv, D]
        kmin = keys.masked_fill(~v, float("inf")).view(-1, st, Hkv, D).amin(1)
        r = rows[b][rvalid[b]]
        qs = q[r].float().view(-1, Hkv, G, D).permute(1, 0, 2, 3).reshape(Hkv, -1, D)  # [Hkv, NQ*G, D]
        bound = torch.maximum(qs[:, :, None] * kmax.permute(1, 0, 2)[:, None],
                              qs[:, :, None] * kmin.permute(1, 0, 2)[:, None]).sum(-1).amax(1)  # [Hkv, U]
        order = torch.argsort(bound, dim=-1, descending=True, stable=True)  # ties: lower position first
        blocks = (order[..., None] + u0) * per + torch.arange(per)  # [Hkv, U, per] in rank order
        blocks = blocks.flatten(1)
        ok = (blocks >= begin) & (blocks < end)
        if shortlist:  # exact block scores (max over keys, scored rows, group heads), indexed by block - u0 * per
            s = torch.einsum("hmd,phd->hpm", qs, keys).amax(-1).masked_fill(~valid[None], NEG_INF)
            exact = s.view(Hkv, -1, bk).amax(-1)
        for h in range(Hkv):
            if shortlist:
                cand = torch.sort(blocks[h][ok[h]][: int(shortlist * n_select)]).values  # position order: ties
                chosen = cand[torch.argsort(exact[h, cand - u0 * per], descending=True, stable=True)][:n_select]
            else:
                chosen = blocks[h][ok[h]][:n_select]
            out[b, h, : chosen.numel()] = torch.sort(chosen).values.to(torch.int32)
    return out


def mask_summary_norm(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, window=1024, **kw):
    """``mask_summary`` on the normalised score (``_normalised``: the offset rides in an extra dimension whose
    summary is exact, so the bound is lowered by the same offset)."""
    q2, k2 = _normalised(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start,
                         sink_tokens=kw["sink_tokens"], window=window)
    return mask_summary(q2, k2, block_table, qb_req, qb_start, qb_len, window_start, **kw)


def mask_summary_for(cfg, shortlist: float = 0):
    """The summary selection on the score ``cfg`` uses (normalised over ``cfg.norm_keys``, or raw); ``shortlist``
    > 0: summaries shortlist, exact stage keeps (``mask_summary``)."""
    from functools import partial

    fn = partial(mask_summary_norm, window=cfg.norm_keys) if cfg.normalised_score else mask_summary
    return partial(fn, shortlist=shortlist) if shortlist else fn
