"""Plain-torch reference of HiP attention over vLLM's paged KV cache: the oracle for every kernel.

Readable first, vectorised where that keeps it readable. Imports torch only.

Conventions shared with the Triton kernels (``kernels/triton_hip.py``):

* ``k_cache`` / ``v_cache``: ``[num_blocks, page_size, num_kv_heads, head_size]`` strided views of vLLM's
  cache (never assumed contiguous). Token ``t`` of request ``r`` lives at
  ``cache[block_table[r, t // page_size], t % page_size]``.
* A batch is ragged: request ``r`` owns query rows ``query_start_loc[r] : query_start_loc[r+1]``; those
  rows sit at positions ``seq_lens[r] - q_len[r] ... seq_lens[r] - 1``.
* Two-tier (KV offload) mode: every op also takes ``host_k_cache`` / ``host_v_cache`` (default None). The
  cache is then split into a device tier (``k_cache``, pages ``[0, G)`` with ``G = k_cache.shape[0]``) and a
  host tier (``host_k_cache``, pages ``[0, H)``; on CUDA pinned host memory mapped into the GPU's address
  space). Block tables and slot mappings hold *physical* page ids in ``[0, G + H)``: page ``p < G`` is
  ``k_cache[p]``, page ``p >= G`` is ``host_k_cache[p - G]`` (same for V). The reference materialises that
  virtual cache (``tiered_cache``) and runs the unchanged code on it.
* Query blocks ("qb") cut each request's rows into runs of ``block_size_q``; see ``make_query_blocks``.
* Key blocks are runs of ``block_size_k`` positions: key block ``j`` is positions ``[j*bk, (j+1)*bk)``.
  They are logical (position) blocks, independent of vLLM's page size.
* For a query block whose first position is ``p0`` the *window start* is
  ``ws = max(0, floor((p0 - window) / bk) * bk)``; every query ``p`` of the block attends to
  ``sink = [0, min(sink_tokens, ws))``, ``window = [ws, p]`` and the selected key blocks, which all lie in
  ``[sink_tokens, ws)``. ``ws = 0`` means dense causal attention.
* Mask estimation selects ``n = k / bk`` key blocks per (query block, KV head). Selection is reduced over
  the query heads of one KV-head group, so it never depends on how heads are split over TP ranks.
  Unused slots hold -1; used ones are sorted ascending.
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------- layout
def make_query_blocks(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_size_q: int):
    """Cut a ragged batch into query blocks aligned to absolute positions.

    Block boundaries sit at positions that are multiples of ``block_size_q``, so a prompt cut into chunks at
    multiples of ``block_size_q`` (or not chunked at all) gets the same blocks, hence the same masks. A chunk
    that starts or ends inside a block yields a partial block there.
    Returns int32 tensors ``(qb_req, qb_start, qb_len, qb_pos0)``: the request, first query row, number of
    rows and position of the first row of every query block, in request order.
    """
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    p_start = seq_lens.long() - q_lens  # position of each request's first row this step
    lead = p_start % block_size_q  # rows of the first block that belong to an earlier step
    nqb = torch.where(q_lens > 0, (lead + q_lens + block_size_q - 1) // block_size_q, torch.zeros_like(q_lens))
    qb_req = torch.repeat_interleave(torch.arange(len(q_lens), device=qsl.device), nqb)
    first_qb = torch.cumsum(nqb, 0) - nqb
    j = torch.arange(len(qb_req), device=qsl.device) - first_qb[qb_req]
    lo = torch.clamp(j * block_size_q - lead[qb_req], min=0)  # first row of the block, relative to the request
    hi = torch.clamp((j + 1) * block_size_q - lead[qb_req], max=q_lens[qb_req])
    qb_start = qsl[qb_req] + lo
    qb_pos0 = p_start[qb_req] + lo
    return tuple(t.to(torch.int32) for t in (qb_req, qb_start, hi - lo, qb_pos0))


def window_starts(pos0: torch.Tensor, window: int, block_size_k: int) -> torch.Tensor:
    """First position of the sliding window for a query block starting at ``pos0`` (key-block aligned)."""
    ws = torch.div(pos0.long() - window, block_size_k, rounding_mode="floor") * block_size_k
    return torch.clamp(ws, min=0).to(torch.int32)


def _paged(cache: torch.Tensor, block_table: torch.Tensor, req: torch.Tensor, pos: torch.Tensor):
    """cache rows for positions ``pos`` (any shape, broadcast with ``req``) -> ``[..., H, D]``."""
    page = cache.shape[1]
    blk = block_table.long()[req, torch.div(pos, page, rounding_mode="floor")]
    return cache[blk, pos % page]


def tiered_cache(cache: torch.Tensor, host_cache: torch.Tensor | None) -> torch.Tensor:
    """The virtual cache of physical pages ``[0, G + H)``: the device tier, then the host tier (a copy).

    ``cache`` itself when there is no host tier.
    """
    if host_cache is None:
        return cache
    return torch.cat([cache, host_cache.to(cache.device)])


def gather_kv(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one request, ``[length, H, D]``."""
    pos = torch.arange(length, device=cache.device)
    return _paged(cache, block_table_row[None], torch.zeros_like(pos), pos)


# ------------------------------------------------------------------------------------ KV cache write
def kv_write_reference(key, value, k_cache, v_cache, slot_mapping, *, host_k_cache=None, host_v_cache=None):
    """Write ``key``/``value`` rows ``[T, H, D]`` to their slots; negative slots (padding) are skipped.

    With a host tier, slots of pages ``>= G = k_cache.shape[0]`` go to ``host_*_cache[page - G]``.
    """
    slots = slot_mapping.long()
    keep = slots >= 0
    slots = slots[keep]
    key, value = key[keep], value[keep]
    page = k_cache.shape[1]
    blk, off = torch.div(slots, page, rounding_mode="floor"), slots % page
    if host_k_cache is None:
        k_cache[blk, off] = key.to(k_cache.dtype)
        v_cache[blk, off] = value.to(v_cache.dtype)
        return
    G = k_cache.shape[0]
    dev = blk < G
    k_cache[blk[dev], off[dev]] = key[dev].to(k_cache.dtype)
    v_cache[blk[dev], off[dev]] = value[dev].to(v_cache.dtype)
    host = ~dev
    hblk, hoff = (blk[host] - G).to(host_k_cache.device), off[host].to(host_k_cache.device)
    host_k_cache[hblk, hoff] = key[host].to(host_k_cache.device, host_k_cache.dtype)
    host_v_cache[hblk, hoff] = value[host].to(host_v_cache.device, host_v_cache.dtype)


# --------------------------------------------------------------------------------- mask estimation
def strided_query_rows(qb_start, qb_len, block_size_q: int, query_stride: int):
    """Rows scored by mask estimation: the last row of each block and every ``query_stride``-th before it.

    Returns ``(rows [QB, NQ] int64, valid [QB, NQ] bool)``.
    """
    nq = (block_size_q + query_stride - 1) // query_stride
    off = qb_len.long()[:, None] - 1 - torch.arange(nq, device=qb_len.device)[None] * query_stride
    valid = off >= 0
    rows = qb_start.long()[:, None] + torch.clamp(off, min=0)
    return rows, valid


def mask_group_width(n_select: int) -> int:
    """Entries per (row, KV head) of the staged refresh's group caches (``hip_mask_reference``'s ``groups``): the
    selection size rounded up to a power of two, the stride the Triton kernels address them with."""
    return 1 << max(0, int(n_select) - 1).bit_length()


def hip_mask_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    qb_req: torch.Tensor,
    qb_start: torch.Tensor,
    qb_len: torch.Tensor,
    window_start: torch.Tensor,
    *,
    n_select: int,
    block_size_q: int,
    block_size_k: int,
    sink_tokens: int,
    query_stride: int = 1,
    exact_blocks: int = 1,
    norm_window: int = 0,
    host_k_cache: torch.Tensor | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    groups_row: torch.Tensor | None = None,
    coarse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hierarchical top-k key-block selection (HiP v3, with an exact last stage) for every (query block, KV head).

    Candidates are key blocks in ``[sink_tokens/bk, window_start/bk)``. They are split into ``n_select``
    groups of near-equal size; each round splits every group in two, scores each half by the best
    ``q . k`` between the block's strided queries (all query heads of the KV-head group) and the ``bk`` keys
    of the half's centre key block, and keeps the ``n_select`` best halves (ties: lower position first).
    Rounds repeat until no group spans more than ``exact_blocks`` key blocks. Then, if groups still span
    several blocks, one exact round scores every block of every group by its own keys and keeps the
    ``n_select`` best blocks (same tie rule). ``exact_blocks=1`` is plain HiP v3 (halving down to single blocks,
    each half judged by its centre block only); larger values replace the last rounds' guesses by exact block
    scores, for about the same number of keys read. With ``n_select`` >= candidates, all are selected.
    ``norm_window`` > 0: the *normalised* score. Each scored row's ``q . k`` (per query head) is lowered by that
    row's best logit over keys it attends anyway: the sink and the first ``norm_window`` keys of the window,
    ``[ws, ws + norm_window)``. So a query head whose candidates add nothing beyond what it already sees cannot
    outbid, in the max over the KV group's heads, a head that needs a far block (BENCHMARKS.md §4). It must not
    exceed the window that gave ``window_start`` (those keys then precede every scored row).
    Returns ``[QB, Hkv, n_select]`` int32, sorted ascending, -1 padded. ``host_k_cache``: see the module docstring.

    Staged refresh (decode): ``groups`` = ``(lo, hi)``, int32 ``[R, Hkv, >= n_select]`` caches of the groups that
    enter the exact round, at row ``groups_row[i]`` for query block ``i``. Blocks with ``coarse[i]`` nonzero run
    the whole search and store those groups; the others skip the halving rounds and run only the exact round over
    the groups stored by their last coarse search (same ``window_start``, so the same group layout). Needs
    ``exact_blocks`` > 1.
    """
    k_cache = tiered_cache(k_cache, host_k_cache)
    dev = q.device
    n, bk = n_select, block_size_k
    QB = qb_req.shape[0]
    Hq, D = q.shape[1], q.shape[2]
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    req = qb_req.long()
    begin = torch.full((QB,), sink_tokens // bk, dtype=torch.long, device=dev)
    end = window_start.long() // bk
    count = torch.clamp(end - begin, min=0)
    out = torch.full((QB, Hkv, n), -1, dtype=torch.int32, device=dev)

    # Few candidates: select them all.
    ar = torch.arange(n, device=dev)
    all_idx = begin[:, None] + ar[None]
    take_all = torch.where(ar[None] < count[:, None], all_idx, torch.full_like(all_idx, -1))
    out[:] = take_all[:, None, :].to(torch.int32)
    hier = count > n
    if not bool(hier.any()):
        return out

    sel = hier.nonzero().squeeze(1)
    S = sel.shape[0]
    b_sel, c_sel = begin[sel], count[sel]
    # Queries scored: [S, Hkv, G*NQ, D] with a validity mask.
    rows, rvalid = strided_query_rows(qb_start[sel], qb_len[sel], block_size_q, query_stride)
    NQ = rows.shape[1]
    qs = q[rows].float()  # [S, NQ, Hq, D]
    qs = qs.view(S, NQ, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(S, Hkv, G * NQ, D)
    qvalid = rvalid[:, None, None, :].expand(S, 1, G, NQ).reshape(S, 1, G * NQ)
    heads = torch.arange(Hkv, device=dev)
    page = k_cache.shape[1]
    offset = torch.zeros(S, Hkv, G * NQ, device=dev)  # subtracted from every scored row's logits
    if norm_window > 0:
        # the keys every row attends anyway: sink [0, sink) (ws > sink on this path) and [ws, ws + norm_window)
        ref_pos = torch.cat([torch.arange(sink_tokens, device=dev)[None].expand(S, -1),
                             window_start[sel].long()[:, None] + torch.arange(norm_window, device=dev)], 1)
        phys = block_table.long()[req[sel][:, None], torch.div(ref_pos, page, rounding_mode="floor")]
        ref_keys = k_cache[phys, ref_pos % page].float()  # [S, P, Hkv, D]
        offset = torch.einsum("sphd,shqd->shqp", ref_keys, qs).amax(-1).masked_fill(~qvalid, 0.0)

    def score(rep_block: torch.Tensor) -> torch.Tensor:  # [S, Hkv, M] key-block ids -> [S, Hkv, M]
        pos = rep_block[..., None] * bk + torch.arange(bk, device=dev)  # [S, Hkv, M, bk]
        phys = block_table.long()[req[sel][:, None, None, None], torch.div(pos, page, rounding_mode="floor")]
        keys = k_cache[phys, pos % page, heads[None, :, None, None]].float()  # [S, Hkv, M, bk, D]
        s = torch.einsum("shmbd,shqd->shmbq", keys, qs) - offset[:, :, None, None, :]
        s = s.masked_fill(~qvalid[:, :, None, None, :], NEG_INF)
        return s.amax(dim=(-1, -2))

    i = torch.arange(n + 1, device=dev)
    bounds = b_sel[:, None] + torch.div(i[None] * c_sel[:, None], n, rounding_mode="floor")  # [S, n+1]
    lo = bounds[:, :-1][:, None, :].expand(S, Hkv, n).contiguous()
    hi = bounds[:, 1:][:, None, :].expand(S, Hkv, n).contiguous()
    # Rounds per row from its candidate count alone (as the kernels decide them): halve the largest group size
    # until it is at most E.
    E = max(1, int(exact_blocks))
    rounds = torch.zeros_like(c_sel)
    size = -torch.div(-c_sel, n, rounding_mode="floor")
    while bool((size > E).any()):
        rounds += size > E
        size = torch.where(size > E, -torch.div(-size, 2, rounding_mode="floor"), size)
    if groups is not None:
        assert E > 1 and groups_row is not None and coarse is not None, "staged refresh: exact_blocks > 1, rows, flags"
        g_row = groups_row.long()[sel]
        stale = ~coarse.bool()[sel]  # exact round only, over the stored groups
        lo = torch.where(stale[:, None, None], groups[0][g_row, :, :n].long(), lo)
        hi = torch.where(stale[:, None, None], groups[1][g_row, :, :n].long(), hi)
        rounds = torch.where(stale, torch.zeros_like(rounds), rounds)
    for r in range(int(rounds.max())):
        split = (hi - lo > 1) & (rounds > r)[:, None, None]
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        # Halves interleaved (left_i, right_i) so candidate order is position order.
        c_lo = torch.stack([lo, mid], -1).flatten(-2)
        c_hi = torch.stack([torch.where(split, mid, hi), hi], -1).flatten(-2)
        valid = torch.stack([torch.ones_like(split), split], -1).flatten(-2)
        rep = torch.div(c_lo + c_hi - 1, 2, rounding_mode="floor")
        sc = score(torch.where(valid, rep, c_lo)).masked_fill(~valid, NEG_INF)
        order = torch.sort(sc, dim=-1, descending=True, stable=True).indices[..., :n]
        order = torch.sort(order, dim=-1).values  # back to position order
        lo, hi = torch.gather(c_lo, -1, order), torch.gather(c_hi, -1, order)
    if groups is not None:
        fresh = ~stale
        groups[0][g_row[fresh], :, :n] = lo[fresh].to(groups[0].dtype)
        groups[1][g_row[fresh], :, :n] = hi[fresh].to(groups[1].dtype)
    if E > 1 and bool((hi - lo > 1).any()):
        # Exact round: every block of every group (groups are disjoint and in position order, so the flattened
        # candidates are too), each scored by its own keys; the n best blocks.
        blocks = (lo[..., None] + torch.arange(E, device=dev)).flatten(-2)  # [S, Hkv, n*E]
        valid = (blocks < hi[..., None].expand(S, Hkv, n, E).flatten(-2))
        sc = score(torch.where(valid, blocks, lo[..., :1].expand_as(blocks))).masked_fill(~valid, NEG_INF)
        order = torch.sort(sc, dim=-1, descending=True, stable=True).indices[..., :n]
        lo = torch.gather(blocks, -1, torch.sort(order, dim=-1).values)
    out[sel] = lo.to(torch.int32)
    return out


# ------------------------------------------------------------------------------ block-sparse attention
def allowed_keys(length: int, window_start: int, sink_tokens: int, blocks: torch.Tensor, block_size_k: int):
    """Bool mask ``[H, length]``: positions a query block attends to before causality (sink, window, selected).

    ``blocks``: ``[H, n]`` selected key blocks, -1 padded.
    """
    H = blocks.shape[0]
    t = torch.arange(length, device=blocks.device)
    m = ((t < min(sink_tokens, window_start)) | (t >= window_start))[None].expand(H, length).clone()
    in_sel = torch.zeros(H, length // block_size_k + 2, dtype=torch.bool, device=blocks.device)
    b = blocks.long()
    in_sel.scatter_(1, torch.where(b >= 0, b, in_sel.shape[1] - 1), True)
    in_sel[:, -1] = False
    return m | in_sel[:, t // block_size_k]


def hip_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    qb_req: torch.Tensor,
    qb_start: torch.Tensor,
    qb_len: torch.Tensor,
    qb_pos0: torch.Tensor,
    window_start: torch.Tensor,
    indices: torch.Tensor,
    *,
    sink_tokens: int,
    block_size_k: int,
    scale: float,
    out: torch.Tensor | None = None,
    host_k_cache: torch.Tensor | None = None,
    host_v_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every query block over sink + window + its selected key blocks (``indices[qb]``).

    ``q``: ``[T, Hq, D]``; ``indices``: ``[QB, Hkv, n]``. Softmax in fp32; output in ``q``'s dtype.
    Blocks with ``qb_len == 0`` are inert (padding rows of a fixed-size decode batch) and write nothing.
    ``host_k_cache`` / ``host_v_cache``: see the module docstring.
    """
    k_cache, v_cache = tiered_cache(k_cache, host_k_cache), tiered_cache(v_cache, host_v_cache)
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    if out is None:
        out = torch.empty(T, Hq, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    cached_req, keys, vals = -1, None, None
    for b in range(qb_req.shape[0]):
        r, s, ln, p0, ws = (int(x[b]) for x in (qb_req, qb_start, qb_len, qb_pos0, window_start))
        if ln <= 0:  # inert block (padding of a fixed-size decode batch): writes nothing
            continue
        L = p0 + ln
        if r != cached_req or keys.shape[0] < L:
            L_req = int(seq_lens[r])
            keys = gather_kv(k_cache, block_table[r], L_req).float()  # [L, Hkv, D]
            vals = gather_kv(v_cache, block_table[r], L_req).float()
            cached_req = r
        causal = torch.arange(L, device=q.device)[None] <= (p0 + torch.arange(ln, device=q.device))[:, None]
        mask = allowed_keys(L, ws, sink_tokens, indices[b], block_size_k)[:, None, :] & causal[None]  # [Hkv, ln, L]
        qq = q[s : s + ln].float().view(ln, Hkv, G, D).permute(1, 2, 0, 3)  # [Hkv, G, ln, D]
        sc = torch.einsum("hgqd,lhd->hgql", qq, keys[:L]) * scale
        sc = sc.masked_fill(~mask[:, None], NEG_INF)
        p = torch.softmax(sc, dim=-1)
        o = torch.einsum("hgql,lhd->qhgd", p, vals[:L])
        out[s : s + ln] = o.reshape(ln, Hq, -1).to(out.dtype)
    return out


def dense_attention_reference(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, *, scale, block_size_q=64,
                              host_k_cache=None, host_v_cache=None):
    """Causal dense attention over the paged cache: HiP with every window starting at 0."""
    qb = make_query_blocks(query_start_loc, seq_lens, block_size_q)
    zeros = torch.zeros_like(qb[0])
    idx = torch.full((qb[0].shape[0], k_cache.shape[2], 1), -1, dtype=torch.int32, device=q.device)
    return hip_attention_reference(
        q, k_cache, v_cache, block_table, seq_lens, *qb, zeros, idx, sink_tokens=0, block_size_k=1, scale=scale,
        host_k_cache=host_k_cache, host_v_cache=host_v_cache,
    )


def selected_fraction(seq_len: int, indices_row: torch.Tensor, window_start: int, sink_tokens: int, block_size_k: int):
    """Fraction of the ``seq_len`` causal keys that a query at the last position attends to (one KV head)."""
    n_sel = int((indices_row >= 0).sum()) * block_size_k
    attended = min(sink_tokens, window_start) + (seq_len - window_start) + n_sel
    return attended / max(seq_len, 1)


def search_schedule(count: int, n_select: int, exact_blocks: int = 1) -> tuple[int, int]:
    """The search's schedule over ``count`` candidate blocks, on the host: ``(halving rounds, group size)``. The
    groups start at ``ceil(count / n_select)`` blocks and are halved until none spans more than ``exact_blocks``;
    an exact round follows when the size left is above 1. ``(0, 0)`` when all candidates are selected. (The
    kernels decide the same per row on the device: ``hip_mask_reference`` and ``triton_hip._halving_rounds``.)"""
    if count <= n_select:
        return 0, 0
    size, rounds = -(-count // n_select), 0
    while size > exact_blocks:
        size, rounds = -(-size // 2), rounds + 1
    return rounds, size


def num_rounds(candidates: int, n_select: int) -> int:
    """Refinement rounds of the hierarchy for ``candidates`` key blocks (0 when all are selected)."""
    if candidates <= n_select:
        return 0
    return math.ceil(math.log2(math.ceil(candidates / n_select)))


# ------------------------------------------------------------------------------ KV offload: selection cache
def selection_cache_reference(cache: torch.Tensor, block_table: torch.Tensor, req: int, lo: torch.Tensor,
                              hi: torch.Tensor, *, n_select: int, exact_blocks: int, block_size_k: int):
    """What KV offload's selection cache holds for one mask row after a whole search (``triton_hip.hip_mask`` with
    ``cand``): for each KV head ``h`` and candidate ``ci`` of the exact round (block ``lo[h, ci // E] + ci % E``,
    valid below ``hi[h, ci // E]``), that block's ``block_size_k`` rows of ``cache`` (request ``req``'s keys or
    values) at rows ``ci * block_size_k ..``. Returns ``(rows [Hkv, C, D], valid [Hkv, C])``, ``C = n_select x
    exact_blocks x block_size_k``; invalid rows are zeros."""
    E, bk = int(exact_blocks), int(block_size_k)
    Hkv, D = cache.shape[2], cache.shape[3]
    ci = torch.arange(n_select * E, device=cache.device)
    blk = lo[:, ci // E].long() + ci % E  # [Hkv, n * E]
    ok = blk < hi[:, ci // E].long()
    pos = (blk.clamp(min=0)[..., None] * bk + torch.arange(bk, device=cache.device)).reshape(Hkv, -1)
    valid = ok.repeat_interleave(bk, dim=1)
    h = torch.arange(Hkv, device=cache.device)[:, None].expand_as(pos)
    page = cache.shape[1]
    phys = block_table.long()[req, torch.div(pos, page, rounding_mode="floor").clamp(max=block_table.shape[1] - 1)]
    rows = cache[phys, pos % page, h]  # [Hkv, C, D]
    return torch.where(valid[..., None], rows, torch.zeros((), dtype=cache.dtype, device=cache.device)), valid


# ------------------------------------------------------------------------------ KV offload page swaps
def swap_pages_reference(pairs, d_idx: torch.Tensor, h_idx: torch.Tensor, do: torch.Tensor) -> None:
    """For every ``(device_tier, host_tier)`` in ``pairs`` (pages on dim 0): swap page ``d_idx[i]`` of the
    device tier with page ``h_idx[i]`` of the host tier where ``do[i]``; other pairs stay as they are.
    Static shapes (every candidate pair is copied, inactive ones back onto themselves): no host sync."""
    k = d_idx.shape[0]
    for dev_t, host_t in pairs:
        hi, di = h_idx.to(host_t.device), d_idx.to(dev_t.device)
        a = dev_t.index_select(0, di)
        b = host_t.index_select(0, hi).to(a.dtype)
        m = do.to(a.device).view((k,) + (1,) * (a.dim() - 1))
        dev_t.index_copy_(0, di, torch.where(m, b, a))
        host_t.index_copy_(0, hi, torch.where(m, a, b).to(host_t.dtype))


# ------------------------------------------------------------------------------ decode mask plan
def block_at(block_table: torch.Tensor, r: torch.Tensor, pos: torch.Tensor, page_size: int) -> torch.Tensor:
    """Block id (int64) holding position ``pos`` of batch row ``r`` (positions clamped into the table)."""
    page = torch.clamp(torch.div(pos, page_size, rounding_mode="floor"), 0, block_table.shape[1] - 1)
    return block_table[r, page].long()  # gather, then widen: never convert the whole table


def decode_plan_reference(slot_key, refresh_len, window_start, slot_of_block, first_len, block_table, seq_lens,
                          reqs, prompt_step=None, *, page_size: int, window: int, block_size_k: int, interval: int,
                          dense_below: int, first_steps: int = 0, coarse_interval: int = 0, coarse_len=None):
    """Decode mask plan of one step (``vllm_hip.mask_state`` explains the scheme): each decode request's
    mask-cache row, whether it re-estimates its mask, and its window start. Updates the slot state in place.

    State (int64, last entry of each = trash that absorbs unwanted writes): ``slot_key[slot]`` the block owning
    a slot, ``refresh_len[slot]`` / ``window_start[slot]`` the length and window start at its last refresh,
    ``slot_of_block[block % num_blocks]`` the slot last given to the request whose newest token was in ``block``,
    ``first_len[slot]`` the length at which the slot's request took it (its first decode step, or its first after
    a resume). ``first_steps``: a request also refreshes at every step until its length reaches
    ``first_len + first_steps`` (the answer's first tokens, where one reused mask costs the most, BENCHMARKS.md §4).
    ``reqs``: batch indices of the decode requests; ``prompt_step`` (bool per request) steps still in the prompt.
    ``coarse_interval`` > 0 (staged refresh, ``hip.mask_coarse_interval``): a refresh is *coarse* (the whole search)
    where a refresh of interval 1 would be with ``coarse_interval`` as the interval (no slot, first steps, or the
    length crossed a multiple of it since the last coarse refresh, kept in ``coarse_len[slot]``); the other
    refreshes rerun the exact stage only and keep the window start of the last coarse one.
    Returns ``(row int32, refresh bool, window_start int32, coarse bool)`` per request (coarse = refresh when
    ``coarse_interval`` is 0).
    """
    num_slots, num_blocks = slot_key.numel() - 1, slot_of_block.numel() - 1
    trash_slot = num_slots
    dev = slot_key.device
    r = reqs.long()
    L = seq_lens.long()[r]
    live = L > 0  # padding rows of a fixed-size (CUDA graph) decode batch have no tokens
    key_now = block_at(block_table, r, L - 1, page_size)
    new_page = (L - 1) % page_size == 0
    key_prev = torch.where(new_page & (L > 1), block_at(block_table, r, L - 2, page_size), key_now)
    s_prev = slot_of_block[key_prev % num_blocks]
    own = (slot_key[s_prev] == key_prev) & live
    if prompt_step is not None:
        own &= ~prompt_step.bool()
    # Reuse within one interval-aligned run of positions: a request refreshes when its length crosses a multiple
    # of the interval, so requests of different lengths decoding in lockstep refresh at different steps and each
    # request's schedule depends on its own length only.
    last = refresh_len[s_prev]
    same_run = torch.div(L, interval, rounding_mode="floor") == torch.div(last, interval, rounding_mode="floor")
    fresh = L - first_len[s_prev] < first_steps
    dense = L <= dense_below
    refresh = ~(own & (L > last) & same_run & ~fresh) & ~dense & live
    coarse = refresh
    if coarse_interval:
        c_last = coarse_len[s_prev]
        same_c = torch.div(L, coarse_interval, rounding_mode="floor") == torch.div(c_last, coarse_interval,
                                                                                 rounding_mode="floor")
        coarse = refresh & ~(own & (L > c_last) & same_c & ~fresh)

    # Slots kept this step: those of requests that own one. The others get free slots in batch order.
    trash = torch.full_like(s_prev, trash_slot)
    used = torch.zeros(num_slots + 1, dtype=torch.bool, device=dev)
    used[torch.where(own, s_prev, trash)] = True
    free_cum = torch.cumsum((~used[:num_slots]).to(torch.int64), 0)
    need = ~own & live & ~dense
    rank = torch.cumsum(need.to(torch.int64), 0)  # 1-based rank among requests needing a slot
    new_slot = torch.clamp(torch.searchsorted(free_cum, rank), max=trash_slot)  # the rank-th free slot
    slot = torch.where(own, s_prev, torch.where(need, new_slot, trash))

    new_ws = torch.clamp(torch.div(L - 1 - window, block_size_k, rounding_mode="floor") * block_size_k, min=0)
    ws = torch.where(coarse, new_ws, window_start[slot])
    ws = torch.where(dense | ~live, torch.zeros_like(ws), ws)

    # The slot follows the request to the block of its newest token.
    kept = slot != trash_slot
    w = torch.where(kept, slot, trash)
    slot_key[w] = torch.where(kept, key_now, torch.full_like(key_now, -1))
    slot_of_block[torch.where(kept, key_now % num_blocks, torch.full_like(key_now, num_blocks))] = w
    wr = torch.where(refresh & kept, slot, trash)
    refresh_len[wr] = L
    wc = torch.where(coarse & kept, slot, trash)
    window_start[wc] = new_ws
    if coarse_interval:
        coarse_len[wc] = L
    first_len[torch.where(kept & ~own, slot, trash)] = L
    return slot.to(torch.int32), refresh & kept, ws.to(torch.int32), coarse & kept

def decode_plan_into_reference(slot_key, refresh_len, window_start, slot_of_block, first_len, block_table, seq_lens,
                               reqs, prompt_step, query_start_loc, out: dict, refresh_out, *, dense_to_fa: bool = False,
                               coarse_out=None, **plan_kw) -> None:
    """What the one-launch kernel (``kernels/decode_plan.py``) writes: ``decode_plan_reference``'s plan plus
    the step's decode buffers. ``out`` holds ``req``, ``start``, ``length``, ``pos0``, ``window_start``,
    ``row`` (int32, one entry per row of the captured batch); rows past the requests are padding: length 0 and
    no refresh, so a replayed graph does nothing for them. ``prompt_step``: nonzero per request, or None.
    ``dense_to_fa``: dense rows (at most ``dense_below`` tokens) are left to a FlashAttention call: their
    ``length`` is 0 (the HiP kernels skip them) and ``out["fa_len"]`` holds their length (0 for every other row,
    FlashAttention's ``seqused_k``). ``coarse_out`` (bool, with ``coarse_interval``): the coarse flags."""
    n = reqs.numel()
    d = reqs.long()
    row, refresh, ws, coarse = decode_plan_reference(
        slot_key, refresh_len, window_start, slot_of_block, first_len, block_table, seq_lens, d,
        None if prompt_step is None else prompt_step.bool(), **plan_kw)
    L = seq_lens[d]
    to_fa = (L > 0) & (L <= plan_kw["dense_below"]) if dense_to_fa else torch.zeros_like(L, dtype=torch.bool)
    for name, val in (("req", d), ("start", query_start_loc[d]), ("length", (L > 0) & ~to_fa), ("pos0", L - 1),
                      ("window_start", ws), ("row", row)):
        out[name][:n].copy_(val)
    refresh_out[:n].copy_(refresh)
    out["length"][n:].zero_()
    refresh_out[n:].zero_()
    if coarse_out is not None:
        coarse_out[:n].copy_(coarse)
        coarse_out[n:].zero_()
    if dense_to_fa:
        out["fa_len"][:n].copy_(torch.where(to_fa, L, torch.zeros_like(L)))
        out["fa_len"][n:].zero_()
