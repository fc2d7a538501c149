"""Dispatch of the HiP ops: Triton kernels for CUDA tensors; on CPU the torch reference for mask estimation
and KV writes, and the vectorised torch attention (``kernels/torch_hip.py``).

All paths take the same arguments, so the backend is written once. The CPU paths may sync the host (on CPU
that costs nothing); the Triton path never does.
"""
from __future__ import annotations

import functools

import torch

from vllm_hip import compat
from vllm_hip.kernels import reference as ref
from vllm_hip.kernels import torch_hip


@functools.lru_cache(maxsize=1)
def _triton():
    try:
        from vllm_hip.kernels import triton_hip
    except Exception:  # triton missing or unusable: CUDA tensors then fail loudly in `_use_triton`
        return None
    return triton_hip


def _use_triton(t: torch.Tensor) -> bool:
    if not t.is_cuda:
        return False
    if _triton() is None:
        raise RuntimeError("vllm-hip needs Triton on CUDA devices; install triton matching your torch")
    return True


def on_triton(t: torch.Tensor) -> bool:
    """Whether work on ``t``'s device runs the Triton kernels (CUDA; also forced on CPU by the engine test that
    runs them under the interpreter)."""
    return _use_triton(t)


def kv_write(key, value, k_cache, v_cache, slot_mapping, host_k_cache=None, host_v_cache=None) -> None:
    """``host_*_cache``: the host tier of an offloaded layer (slots >= its device pages land there)."""
    tier = dict(host_k_cache=host_k_cache, host_v_cache=host_v_cache) if host_k_cache is not None else {}
    if _use_triton(key):
        _triton().kv_write(key, value, k_cache, v_cache, slot_mapping, **tier)
    else:
        ref.kv_write_reference(key, value, k_cache, v_cache, slot_mapping, **tier)


def mask(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, n_select, block_size_q,
         block_size_k, sink_tokens, query_stride, exact_blocks=1, norm_window=0, out=None, out_row=None,
         active=None, host_k_cache=None, groups=None, coarse=None, cand=None, v_cache=None,
         host_v_cache=None) -> torch.Tensor:
    """Selected key blocks ``[QB, Hkv, n]``; with ``out``/``out_row``/``active``: written into ``out`` rows.
    ``groups``/``coarse``: the staged refresh (``hip_mask_reference``), group caches at the ``out_row`` rows.
    ``cand`` (with ``v_cache``/``host_v_cache``): KV offload's selection cache (``triton_hip.hip_mask``); it only
    changes where keys are read from, so the CPU path, which reads the pages, ignores it."""
    kw = dict(n_select=n_select, block_size_q=block_size_q, block_size_k=block_size_k,
              sink_tokens=sink_tokens, query_stride=query_stride, exact_blocks=exact_blocks, norm_window=norm_window)
    if host_k_cache is not None:
        kw["host_k_cache"] = host_k_cache
    if _use_triton(q):
        if cand is not None:
            kw.update(cand=cand, v_cache=v_cache, host_v_cache=host_v_cache)
        return _triton().hip_mask(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start,
                                  out=out, out_row=out_row, active=active, groups=groups, coarse=coarse, **kw)
    if active is not None:
        keep = active.bool()
        qb_req, qb_start, qb_len, window_start = (t[keep] for t in (qb_req, qb_start, qb_len, window_start))
        out_row = out_row[keep] if out_row is not None else None
        coarse = coarse[keep] if coarse is not None else None
    if groups is not None:
        kw.update(groups=groups, groups_row=out_row, coarse=coarse)
    idx = ref.hip_mask_reference(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, **kw)
    if out is None:
        return idx
    rows = out_row.long() if out_row is not None else torch.arange(idx.shape[0], device=idx.device)
    out[rows] = idx
    return out


def attention(q, k_cache, v_cache, block_table, seq_lens, qb_req, qb_start, qb_len, qb_pos0, window_start,
              indices, *, sink_tokens, block_size_k, scale, out, indices_row=None, max_qb_len=None,
              host_k_cache=None, host_v_cache=None, cand=None, exact_blocks=1) -> torch.Tensor:
    """Block-sparse attention; ``max_qb_len`` (longest query block, 1 for decode) sizes the kernel's tiles.
    ``cand``/``exact_blocks``: KV offload's selection cache (``triton_hip.hip_attention``; ignored on CPU)."""
    tier = dict(host_k_cache=host_k_cache, host_v_cache=host_v_cache) if host_k_cache is not None else {}
    if _use_triton(q):
        if cand is not None:
            tier.update(cand=cand, exact_blocks=exact_blocks)
        return _triton().hip_attention(q, k_cache, v_cache, block_table, seq_lens, qb_req, qb_start, qb_len,
                                       qb_pos0, window_start, indices, sink_tokens=sink_tokens,
                                       block_size_k=block_size_k, scale=scale, out=out, indices_row=indices_row,
                                       block_size_q=max_qb_len, **tier)
    return torch_hip.hip_attention_torch(q, k_cache, v_cache, block_table, seq_lens, qb_req, qb_start, qb_len,
                                         qb_pos0, window_start, indices, sink_tokens=sink_tokens,
                                         block_size_k=block_size_k, scale=scale, out=out, indices_row=indices_row,
                                         **tier)


def flash_prefill(q, k_cache, v_cache, dp, *, scale, out) -> None:
    """Dense causal attention of the rows in ``dp`` (a ``backend.DensePrefill``: prefill, or decode with one
    query token per request) with vLLM's FlashAttention."""
    fa, version = compat.flash_attn_varlen()
    t0, T = dp.token_start, out.shape[0] if dp.token_end is None else dp.token_end
    splits = dict(num_splits=dp.num_splits) if dp.num_splits and version == 3 else {}  # FA2 takes no split count
    fa(q=q[t0:T], k=k_cache, v=v_cache, out=out[t0:T], cu_seqlens_q=dp.cu_seqlens_q, max_seqlen_q=dp.max_seqlen_q,
       seqused_k=dp.seqused_k, max_seqlen_k=dp.max_seqlen_k, softmax_scale=scale, causal=True,
       block_table=dp.block_table, fa_version=version, **splits)


def flash_attn_check(device, dtype, head_size: int, num_kv_heads: int, page_size: int) -> str | None:
    """Run vLLM's FlashAttention on a small cache in our KV layout (K and V interleaved per token, read as
    strided views) against our Triton dense kernel, once prefill-shaped and once decode-shaped. None if they
    agree, else why FlashAttention cannot serve."""
    found = compat.flash_attn_varlen()
    if found is None:
        return "vLLM's FlashAttention is not available"
    fa, version = found
    g = torch.Generator(device="cpu").manual_seed(0)
    blocks, ctx, new = 6, 5 * page_size - 3, 37
    kv = torch.randn(blocks, page_size, num_kv_heads, 2 * head_size, generator=g).to(device, dtype).transpose(1, 2)
    k_cache, v_cache = compat.split_kv_cache(kv, head_size)
    hq = 2 * num_kv_heads
    q = torch.randn(new, hq, head_size, generator=g).to(device, dtype)
    bt = torch.randperm(blocks, generator=g)[:5].to(device, torch.int32)[None]
    seq = torch.tensor([ctx], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, new], dtype=torch.int32, device=device)
    want = _triton().dense_attention(q, k_cache, v_cache, bt, seq, qsl, scale=head_size ** -0.5)
    try:
        got = torch.empty_like(q)
        fa(q=q, k=k_cache, v=v_cache, out=got, cu_seqlens_q=qsl, max_seqlen_q=new, seqused_k=seq, max_seqlen_k=ctx,
           softmax_scale=head_size ** -0.5, causal=True, block_table=bt, fa_version=version)
    except Exception as e:  # layout or dtype FA rejects
        return f"FlashAttention {version} rejected the layout: {e!r}"[:300]
    # Decode shape as the builder passes it: one query token per request, a static max_seqlen_k far above the
    # contexts (what a captured graph replays), requests of different lengths.
    lens = torch.tensor([ctx, 1, 2 * page_size + 5], dtype=torch.int32, device=device)
    qd = torch.randn(3, hq, head_size, generator=g).to(device, dtype)
    btd = torch.stack([torch.randperm(blocks, generator=g)[:5] for _ in range(3)]).to(device, torch.int32)
    cu = torch.arange(4, dtype=torch.int32, device=device)
    want_d = _triton().dense_attention(qd, k_cache, v_cache, btd, lens, cu, scale=head_size ** -0.5)
    try:
        got_d = torch.empty_like(qd)
        fa(q=qd, k=k_cache, v=v_cache, out=got_d, cu_seqlens_q=cu, max_seqlen_q=1, seqused_k=lens,
           max_seqlen_k=1 << 16, softmax_scale=head_size ** -0.5, causal=True, block_table=btd, fa_version=version)
    except Exception as e:
        return f"FlashAttention {version} rejected the decode call: {e!r}"[:300]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    err = max((got.float() - want.float()).abs().max().item(), (got_d.float() - want_d.float()).abs().max().item())
    return None if err < 2e-2 else f"FlashAttention {version} disagrees with the Triton kernel (max error {err:.3g})"


def compile_kernels(device, dtype, *, num_heads: int, num_kv_heads: int, head_size: int, page_size: int,
                    block_table_width: int, cfg, host_tier: bool = False) -> None:
    """Launch every Triton kernel variant the HiP layers use (prefill and decode shapes, both mask paths, split
    and unsplit attention, the KV write) once on a tiny cache, so Triton compiles them at start-up and never in
    a serving step (vLLM's jit_monitor flags such compiles; each costs seconds). What decides a compiled variant
    (head counts and size, dtype, HiP settings, the cache's strides, which tensors are 16-byte aligned) is the
    engine's; the sizes are tiny. ``host_tier`` (KV offload): the two-tier variants too, with a small host tier
    mapped the way the offload manager maps its own."""
    th = _triton()
    g = torch.Generator(device="cpu").manual_seed(0)
    D, bq, bk = head_size, cfg.block_size_q, cfg.block_size_k
    ctx = min(block_table_width * page_size, cfg.sink_tokens + cfg.sliding_window + 2 * cfg.k + 2 * bq)
    pages = -(-ctx // page_size)

    def paged(n):  # vLLM's layout: physical [pages, page, heads, 2*hs], logical [pages, heads, page, 2*hs]
        return torch.randn(n, page_size, num_kv_heads, 2 * D, generator=g).to(dtype).transpose(1, 2)

    k_cache, v_cache = compat.split_kv_cache(paged(pages).to(device), D)
    tiers = [{}]
    if host_tier:
        host = paged(2).transpose(1, 2).contiguous()
        if device.type == "cuda":
            pinned = host.pin_memory()  # torch's pinned allocator: freed safely after the warm-up
            host = compat.device_view_of_host(pinned)
        hk, hv = compat.split_kv_cache(host.transpose(1, 2), D)
        tiers.append(dict(host_k_cache=hk, host_v_cache=hv))
    bt = torch.zeros(1, block_table_width, dtype=torch.int32)
    bt[0, :pages] = torch.arange(pages, dtype=torch.int32)
    bt = bt.to(device)
    i32 = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    seq = i32([ctx])
    mask_kw = dict(cfg.mask_kwargs, block_size_q=bq, block_size_k=bk)
    q = torch.randn(bq, num_heads, D, generator=g).to(device, dtype)
    q1 = q[:1].contiguous()
    req, start, ln, pos0 = i32([0]), i32([0]), i32([bq]), i32([ctx - bq])
    ws = ref.window_starts(pos0, cfg.sliding_window, bk)
    one, cache = i32([1]), torch.full((2, num_kv_heads, cfg.n_select), -1, dtype=torch.int32, device=device)
    pos1 = i32([ctx - 1])
    ws1 = ref.window_starts(pos1, cfg.sliding_window, bk)
    key = torch.randn(2, num_kv_heads, D, generator=g).to(device, dtype)
    for tier in tiers:
        common = dict(sink_tokens=cfg.sink_tokens, block_size_k=bk, scale=D ** -0.5, **tier)
        mask_tier = dict(mask_kw, host_k_cache=tier.get("host_k_cache"))
        # prefill: one query block of bq rows ending at the context's end; both mask paths; attention split or not
        for single in (True, False):
            idx = th.hip_mask(q, k_cache, bt, req, start, ln, ws, single_launch=single, **mask_tier)
        for splits in (1, 2):
            th.hip_attention(q, k_cache, v_cache, bt, seq, req, start, ln, pos0, ws, idx, out=torch.empty_like(q),
                             block_size_q=bq, num_splits=splits, **common)
        # decode: one row, cached-mask rows and refresh flags as the backend passes them; attention split or not
        for single in (True, False):  # large decode batches take the one-launch path
            th.hip_mask(q1, k_cache, bt, req, start, one, ws1, out=cache, out_row=req, active=one.bool(),
                        single_launch=single, **mask_tier)
        cand = [None]
        if cfg.mask_coarse_interval:  # the staged refresh's variant (per-round path, group caches)
            width = ref.mask_group_width(cfg.n_select)
            groups = tuple(torch.zeros((2, num_kv_heads, width), dtype=torch.int32, device=device) for _ in range(2))
            if tier and cfg.offload.selection_cache_gib > 0:  # KV offload's selection cache: its variants too
                from vllm_hip.kv_offload import alloc_selection_cache

                cand.append(alloc_selection_cache(cfg, 2, num_kv_heads, D, dtype, device, cache))
            for c in cand:
                extra = {} if c is None else dict(cand=c, v_cache=v_cache, host_v_cache=tier["host_v_cache"])
                th.hip_mask(q1, k_cache, bt, req, start, one, ws1, out=cache, out_row=req, active=one.bool(),
                            groups=groups, coarse=one.bool(), **mask_tier, **extra)
        for c in cand:
            extra = {} if c is None else dict(cand=c, exact_blocks=cfg.mask_exact_blocks)
            for splits in (None, 1):
                th.hip_attention(q1, k_cache, v_cache, bt, seq, req, start, one, pos1, ws1, cache, indices_row=req,
                                 out=torch.empty_like(q1), num_splits=splits, **common, **extra)
        # int64, as vLLM's slot mapping
        th.kv_write(key, key, k_cache, v_cache, torch.tensor([0, 1], device=device), **tier)
    if host_tier:  # the offload manager's page swap: one launch over tiers of the engine's page shape, moving nothing
        from vllm_hip.kernels.page_swap import PageSwapper

        dev_pages = paged(2).transpose(1, 2).contiguous().to(device)
        swap = PageSwapper([(dev_pages.view(2, -1), host.view(2, -1))], device)
        none = torch.zeros(cfg.offload.max_moves, dtype=torch.int64, device=device)
        swap(none, none.clone(), torch.zeros_like(none, dtype=torch.bool))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
