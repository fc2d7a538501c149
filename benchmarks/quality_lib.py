"""Helpers for the quality benchmarks and tests: Q/K/V capture from SmolLM2 (transformers), per-layer HiP
vs dense comparisons on the captured tensors (kernels/reference.py), passkey prompts and their scoring.

Everything here runs on the CPU in plain torch. Nothing here starts vLLM.
"""
from __future__ import annotations

import functools
import math
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import assets  # noqa: E402
from kernels.reference import (  # noqa: E402
    allowed_keys,
    hip_attention_reference,
    hip_mask_reference,
    make_query_blocks,
    mask_group_width,
    window_starts,
)
from vllm_hip.config import HipConfig  # noqa: E402

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------- passkey
def passkey_cases(tokenizer, n_tokens: int, depths, seed: int = 0, haystack: str | None = None,
                  offset: int = 0):
    """``[(depth, passkey, prompt)]`` for one length and seed (passkeys drawn from ``random.Random(seed)``)."""
    haystack = assets.haystack_text() if haystack is None else haystack
    rng = random.Random(seed)
    keys = [rng.randint(10000, 99999) for _ in depths]
    return [(d, k, assets.passkey_prompt(tokenizer, n_tokens, d, k, haystack, offset=offset)[0])
            for d, k in zip(depths, keys)]


# ------------------------------------------------------------------------------------ Q/K/V capture
def load_smollm2(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(assets.smollm2_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    return model, tok


@torch.no_grad()
def capture_qkv(model, input_ids: list[int], layers=None) -> list[dict]:
    """Post-RoPE ``q [T, Hq, D]``, ``k [T, Hkv, D]``, ``v [T, Hkv, D]`` (fp32) of every attention layer.

    A forward pre-hook on each ``self_attn`` module takes its inputs (hidden states and the rotary
    ``(cos, sin)``) and recomputes the projections and the rotary embedding exactly as the module does.
    Only the decoder stack runs (no LM head). ``layers``: indices to keep (default all).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    base = model.model
    keep = set(range(len(base.layers))) if layers is None else set(layers)
    out: dict[int, dict] = {}
    handles = []

    def make_hook(i, attn):
        def hook(mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
            shape = (*h.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(h).view(shape).transpose(1, 2)
            k = attn.k_proj(h).view(shape).transpose(1, 2)
            v = attn.v_proj(h).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out[i] = {"q": q[0].transpose(0, 1).float().contiguous(),
                      "k": k[0].transpose(0, 1).float().contiguous(),
                      "v": v[0].transpose(0, 1).float().contiguous(),
                      "scale": attn.scaling}
        return hook

    for i, layer in enumerate(base.layers):
        if i in keep:
            handles.append(layer.self_attn.register_forward_pre_hook(make_hook(i, layer.self_attn),
                                                                     with_kwargs=True))
    try:
        base(input_ids=torch.tensor([input_ids]), use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    return [out[i] for i in sorted(out)]


def text_ids(tokenizer, text: str, n_tokens: int, offset: int = 0) -> list[int]:
    ids = tokenizer.encode(text[: (offset + n_tokens) * 8], add_special_tokens=False)
    ids = ids[offset: offset + n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"text too short for {n_tokens} tokens at offset {offset}")
    return ids


# ------------------------------------------------------------------------------ per-layer metrics
def _cfg(cfg) -> HipConfig:
    if isinstance(cfg, HipConfig):
        return cfg
    return HipConfig.from_dict(cfg or {})


@torch.no_grad()
def layer_metrics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cfg=None,
                  *, topk: int | None = None, max_blocks: int | None = None, mask_fn=None) -> dict:
    """HiP (kernels/reference.py) vs dense causal attention of one layer on one sequence.

    Only query blocks where HiP prunes (the window starts after the sink and the candidates outnumber the
    selected blocks) are scored; the others are exact by construction. Returns means over their queries:

    * ``rel_l2``: ||o_hip - o_dense|| / ||o_dense|| over those rows and all heads (Frobenius);
    * ``recall_all``: per (query, head), fraction of the ``topk`` (default ``cfg.k``) highest-scoring causal
      keys that HiP attends (sink + window + selected blocks);
    * ``recall_sel``: the same restricted to the candidate region ``[sink, window start)``: of the ``topk``
      best keys there, the fraction inside the selected blocks (the selection alone, strictest);
    * ``block_recall``: of the exact top-n key blocks under HiP's own block score (max of q.k over the
      block's scored queries, the KV group's heads and the block's keys), the fraction HiP's hierarchical
      search found;
    * ``mass``: dense softmax mass that falls on the keys HiP attends;
    * ``blocks``: number of pruned query blocks scored.

    ``mask_fn``: the block selection (default ``hip_mask_reference``, the backend's; e.g.
    ``mask_variants.mask_oracle`` for the ceiling of any selection with the same budget).
    """
    cfg = _cfg(cfg)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    topk = cfg.k if topk is None else topk
    bk, n = cfg.block_size_k, cfg.n_select
    kc, vc = k[None], v[None]  # one page holding the whole sequence
    bt = torch.zeros(1, 1, dtype=torch.int32)
    qsl = torch.tensor([0, T], dtype=torch.int32)
    seq = torch.tensor([T], dtype=torch.int32)
    qb_req, qb_start, qb_len, qb_pos0 = make_query_blocks(qsl, seq, cfg.block_size_q)
    ws = window_starts(qb_pos0, cfg.sliding_window, bk)
    cand = ws.long() // bk - cfg.sink_tokens // bk
    pruned = (cand > n).nonzero().flatten()
    if max_blocks is not None and pruned.numel() > max_blocks:  # evenly spaced subset, always the last
        pick = torch.linspace(0, pruned.numel() - 1, max_blocks).round().long()
        pruned = pruned[pick]
    res = {"rel_l2": 0.0, "recall_all": 1.0, "recall_sel": 1.0, "block_recall": 1.0, "mass": 1.0,
           "blocks": int(pruned.numel())}
    if pruned.numel() == 0:
        return res
    sub = [t[pruned] for t in (qb_req, qb_start, qb_len, qb_pos0, ws)]
    mask_fn = mask_fn or functools.partial(hip_mask_reference, exact_blocks=cfg.mask_exact_blocks,
                                           norm_window=cfg.mask_kwargs["norm_window"])
    idx = mask_fn(q, kc, bt, sub[0], sub[1], sub[2], sub[4], n_select=n,
                             block_size_q=cfg.block_size_q, block_size_k=bk, sink_tokens=cfg.sink_tokens,
                             query_stride=cfg.query_stride)
    o_hip = torch.zeros_like(q)
    hip_attention_reference(q, kc, vc, bt, seq, *sub, idx, sink_tokens=cfg.sink_tokens, block_size_k=bk,
                            scale=scale, out=o_hip)
    err2 = ref2 = 0.0
    rec_all = rec_sel = brec = mass = 0.0
    nq = 0
    nb = 0
    for j in range(pruned.numel()):
        s, ln, p0, w = (int(x[j]) for x in (sub[1], sub[2], sub[3], sub[4]))
        L = p0 + ln
        qq = q[s: s + ln].view(ln, Hkv, G, D).permute(1, 2, 0, 3)  # [Hkv, G, ln, D]
        raw = torch.einsum("hgqd,lhd->hgql", qq, k[:L])  # unscaled q.k
        causal = torch.arange(L)[None] <= (p0 + torch.arange(ln))[:, None]  # [ln, L]
        sc = (raw * scale).masked_fill(~causal, NEG_INF)
        p = torch.softmax(sc, -1)
        o_dense = torch.einsum("hgql,lhd->qhgd", p, v[:L]).reshape(ln, Hq, D)
        err2 += float(((o_hip[s: s + ln] - o_dense) ** 2).sum())
        ref2 += float((o_dense ** 2).sum())
        allow = allowed_keys(L, w, cfg.sink_tokens, idx[j], bk)  # [Hkv, L]
        allow_q = allow[:, None, None, :] & causal  # [Hkv, 1, ln, L]
        mass += float((p * allow_q).sum())
        # recall over all causal keys
        kk = min(topk, L)
        top = sc.topk(kk, dim=-1).indices  # [Hkv, G, ln, kk]
        hit = torch.gather(allow[:, None, None, :].expand(Hkv, G, ln, L), -1, top)
        # rows whose causal count < kk would pick -inf keys; ln <= 64 and L >> kk here, so ignore
        rec_all += float(hit.float().mean(-1).sum())
        # recall within the candidate region [sink, w)
        lo = cfg.sink_tokens
        region = sc[..., lo:w]
        kr = min(topk, w - lo)
        top_r = region.topk(kr, dim=-1).indices + lo
        sel_mask = allow.clone()
        sel_mask[:, :lo] = False
        sel_mask[:, w:] = False
        hit_r = torch.gather(sel_mask[:, None, None, :].expand(Hkv, G, ln, L), -1, top_r)
        rec_sel += float(hit_r.float().mean(-1).sum())
        nq += ln * Hq
        # block recall under HiP's own criterion: its block score, normalised (hip.normalised_score) or raw
        off = torch.arange(ln - 1, -1, -cfg.query_stride)  # scored rows (last row and every stride-th before)
        rb = raw[:, :, off, lo:w]  # [Hkv, G, nq, cand*bk]
        nw = cfg.mask_kwargs["norm_window"]
        if nw:  # each row's best logit over its sink and the window's first nw keys, as the selection subtracts
            ref_keys = torch.cat([torch.arange(cfg.sink_tokens), torch.arange(w, w + nw)])
            rb = rb - raw[:, :, off][..., ref_keys].amax(-1, keepdim=True)
        bscore = rb.amax(dim=(1, 2)).view(Hkv, -1, bk).amax(-1)  # [Hkv, cand]
        exact = bscore.topk(n, dim=-1).indices + lo // bk
        got = idx[j].long()
        inter = (exact[:, :, None] == got[:, None, :]).any(-1).float().mean(-1)  # [Hkv]
        brec += float(inter.mean())
        nb += 1
    res.update(rel_l2=math.sqrt(err2 / max(ref2, 1e-30)), recall_all=rec_all / nq, recall_sel=rec_sel / nq,
               block_recall=brec / nb, mass=mass / nq)
    return res


@torch.no_grad()
def decode_metrics(q, k, v, scale: float, cfg=None, *, steps: int = 64, topk: int | None = None) -> dict:
    """Decode with mask reuse, simulated on captured Q/K/V (teacher forcing).

    The last ``steps`` positions act as decode queries (one token each). A mask is estimated at each of the
    first ``cfg.mask_refresh_first_steps`` steps (at least the first) and wherever the length reaches a multiple
    of ``cfg.mask_refresh_interval``, from that step's query alone, and reused until the next refresh,
    with the window start frozen at the refresh (as ``vllm_hip.mask_state`` does). With
    ``cfg.mask_coarse_interval`` (staged refresh) only the refreshes at its multiples (and the first steps) run the
    whole search; the others rerun the exact stage over its groups and keep its window start. Returns ``rel_l2`` and
    ``mass`` of the decode outputs vs dense, and ``recall_all``: per (step, head), the fraction of the ``topk``
    (default ``cfg.k``) highest-scoring keys that HiP attends (what ``layer_metrics`` measures for prefill
    query blocks, here for one-token queries with a reused mask).
    """
    cfg = _cfg(cfg)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    bk = cfg.block_size_k
    kc, vc, bt = k[None], v[None], torch.zeros(1, 1, dtype=torch.int32)
    R = cfg.mask_refresh_interval
    pos = torch.arange(T - steps, T)
    # position of the refresh each step reuses: each of the first F decode steps, then every length multiple of R
    F = max(1, cfg.mask_refresh_first_steps)
    fresh = pos - (T - steps) < F
    ref_pos = torch.where(fresh, pos, torch.clamp((pos + 1) // R * R - 1, min=T - steps + F - 1))
    one = torch.ones_like(pos, dtype=torch.int32)
    zero = torch.zeros_like(one)
    # mask of every refresh step, from its own query only (decode: block of one query)
    uniq, inv = torch.unique(ref_pos, return_inverse=True)
    mk = dict(n_select=cfg.n_select, block_size_q=1, block_size_k=bk, sink_tokens=cfg.sink_tokens, query_stride=1,
              exact_blocks=cfg.mask_exact_blocks, norm_window=cfg.mask_kwargs["norm_window"])
    C = cfg.mask_coarse_interval
    if C:  # staged refresh: the whole search at the coarse positions, the exact stage alone at the others
        first_u = uniq - (T - steps) < F
        c_of_u = torch.where(first_u, uniq, torch.clamp((uniq + 1) // C * C - 1, min=T - steps + F - 1))
        c_uniq, c_inv = torch.unique(c_of_u, return_inverse=True)
        groups = tuple(torch.zeros(len(c_uniq), Hkv, mask_group_width(cfg.n_select), dtype=torch.int32)
                       for _ in range(2))
        nc = len(c_uniq)
        hip_mask_reference(q, kc, bt, zero[:nc], c_uniq.to(torch.int32), one[:nc],
                           window_starts(c_uniq, cfg.sliding_window, bk), groups=groups,
                           groups_row=torch.arange(nc, dtype=torch.int32), coarse=torch.ones(nc, dtype=torch.bool),
                           **mk)
        ws_u = window_starts(c_of_u, cfg.sliding_window, bk)  # the window start stays the coarse refresh's
        idx_u = hip_mask_reference(q, kc, bt, zero[: len(uniq)], uniq.to(torch.int32), one[: len(uniq)], ws_u,
                                   groups=groups, groups_row=c_inv.to(torch.int32), coarse=uniq == c_of_u, **mk)
        ws = ws_u[inv]
    else:
        ws = window_starts(ref_pos, cfg.sliding_window, bk)
        idx_u = hip_mask_reference(q, kc, bt, zero[: len(uniq)], uniq.to(torch.int32), one[: len(uniq)],
                                   window_starts(uniq, cfg.sliding_window, bk), **mk)
    idx = idx_u[inv]
    seq = torch.tensor([T], dtype=torch.int32)
    o_hip = torch.zeros_like(q)
    hip_attention_reference(q, kc, vc, bt, seq, zero, pos.to(torch.int32), one, pos.to(torch.int32), ws, idx,
                            sink_tokens=cfg.sink_tokens, block_size_k=bk, scale=scale, out=o_hip)
    topk = cfg.k if topk is None else topk
    err2 = ref2 = mass = rec = 0.0
    for j, p in enumerate(pos.tolist()):
        L = p + 1
        qq = q[p].view(Hkv, G, D)
        sc = torch.einsum("hgd,lhd->hgl", qq, k[:L]) * scale
        pr = torch.softmax(sc, -1)
        od = torch.einsum("hgl,lhd->hgd", pr, v[:L]).reshape(Hq, D)
        err2 += float(((o_hip[p] - od) ** 2).sum())
        ref2 += float((od ** 2).sum())
        allow = allowed_keys(L, int(ws[j]), cfg.sink_tokens, idx[j], bk)
        mass += float((pr * allow[:, None, :]).sum()) / Hq
        top = sc.topk(min(topk, L), dim=-1).indices  # [Hkv, G, kk]
        rec += float(torch.gather(allow[:, None, :].expand(Hkv, G, L), -1, top).float().mean())
    return {"rel_l2": math.sqrt(err2 / max(ref2, 1e-30)), "mass": mass / steps, "recall_all": rec / steps}


@torch.no_grad()
def selection_turnover(q, k, cfg=None, *, steps: int = 256, page: int = 16, seed: int = 0) -> dict:
    """How much of a decoding request's selection changes from one mask refresh to the next, on captured Q/K.

    Refreshes happen where the length reaches a multiple of ``cfg.mask_refresh_interval`` within the last ``steps``
    positions, each from its own query (as ``vllm_hip.mask_state`` does after a request's first steps). For each
    refresh after the first: ``page_turnover``, the share of the KV pages holding selected blocks (any head) that
    the previous refresh did not select, which is what an offload tier has to move in; ``block_turnover``, the same
    for (head, block) pairs. ``rand_*`` are the same for uniformly random selections of the same sizes from the
    same candidates (what a model with dummy weights does). ``sel_pages`` / ``cand_pages``: selected pages and
    candidate pages (between sink and window) per refresh.
    """
    cfg = _cfg(cfg)
    T = q.shape[0]
    bk = cfg.block_size_k
    R = cfg.mask_refresh_interval
    pos = torch.tensor([p for p in range(T - steps, T) if (p + 1) % R == 0], dtype=torch.int32)
    ws = window_starts(pos, cfg.sliding_window, bk)
    one = torch.ones_like(pos)
    zero = torch.zeros_like(pos)
    idx = hip_mask_reference(q, k[None], torch.zeros(1, 1, dtype=torch.int32), zero, pos, one, ws,
                             n_select=cfg.n_select, block_size_q=1, block_size_k=bk, sink_tokens=cfg.sink_tokens,
                             query_stride=1, exact_blocks=cfg.mask_exact_blocks,
                             norm_window=cfg.mask_kwargs["norm_window"])
    g = torch.Generator().manual_seed(seed)
    lo = cfg.sink_tokens // bk
    out = {"page_turnover": [], "block_turnover": [], "rand_page_turnover": [], "rand_block_turnover": [],
           "sel_pages": [], "cand_pages": []}
    prev = prev_r = None
    for i in range(len(pos)):
        hi = int(ws[i]) // bk
        sel, rnd = set(), set()
        for h in range(idx.shape[1]):
            b = idx[i, h][idx[i, h] >= 0].tolist()
            sel.update((h, x) for x in b)
            pick = (torch.randperm(max(hi - lo, 0), generator=g)[: len(b)] + lo).tolist()
            rnd.update((h, x) for x in pick)
        cur = (sel, {b * bk // page for _, b in sel})
        cur_r = (rnd, {b * bk // page for _, b in rnd})
        out["sel_pages"].append(len(cur[1]))
        out["cand_pages"].append(max(hi - lo, 0) * bk / page)
        if prev is not None:
            for name, c, pv in (("", cur, prev), ("rand_", cur_r, prev_r)):
                out[name + "block_turnover"].append(len(c[0] - pv[0]) / max(1, len(c[0])))
                out[name + "page_turnover"].append(len(c[1] - pv[1]) / max(1, len(c[1])))
        prev, prev_r = cur, cur_r
    res = {key: sum(v) / max(1, len(v)) for key, v in out.items()}
    res["refreshes"] = len(pos)
    return res


def summarize(per_layer: list[dict], skip=()) -> dict:
    """Mean of every metric over the layers not in ``skip`` (e.g. the configured dense layers)."""
    rows = [m for i, m in enumerate(per_layer) if i not in set(skip)]
    keys = [k for k in rows[0] if k != "blocks"]
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys}


# ------------------------------------------------------------------- HiP inside transformers (simulation)
class HipSim:
    """HiP attention swapped into a transformers Llama (one unpadded sequence, batch 1), to evaluate configs
    without vLLM: prefill uses per-query-block masks (``hip_mask_reference``) as the backend's prefill
    path does; single-token decode steps estimate a mask from the step's query and reuse it for
    ``mask_refresh_interval`` steps with the window start frozen, as ``vllm_hip.mask_state`` does.
    Attention over the mask is a masked SDPA (same math as ``hip_attention_reference``, faster on CPU).

    Use as a context manager around ``model(...)`` calls; ``reset()`` before each new sequence.
    """

    def __init__(self, cfg=None, num_layers: int = 30, mask_fn=None, last_row_block: bool = False):
        self.cfg = _cfg(cfg)
        self.last_row_block = last_row_block  # the prompt's last row estimates its own mask (experiment)
        # the backend's selection; experiments swap in others (mask_variants.py)
        self.mask_fn = mask_fn or functools.partial(hip_mask_reference, exact_blocks=self.cfg.mask_exact_blocks,
                                                    norm_window=self.cfg.mask_kwargs["norm_window"])
        self.num_layers = num_layers
        self.state: dict[int, tuple] = {}
        self._saved = None

    def reset(self):
        self.state.clear()

    def __enter__(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._orig = ALL_ATTENTION_FUNCTIONS["sdpa"]
        self._saved = ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"]
        ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = self._attn
        return self

    def __exit__(self, *exc):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"] = self._saved

    def _attn(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        cfg = self.cfg
        li = module.layer_idx
        B, Hq, Tq, D = query.shape
        L = key.shape[2]
        if li in cfg.dense_layers or L <= cfg.sink_tokens + cfg.sliding_window + cfg.k:
            return self._orig(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
        assert B == 1, "HipSim handles one sequence"
        q = query[0].transpose(0, 1)  # [Tq, Hq, D]
        k = key[0].transpose(0, 1)  # [L, Hkv, D]
        Hkv = k.shape[1]
        G = Hq // Hkv
        bk = cfg.block_size_k
        bt = torch.zeros(1, 1, dtype=torch.int32)
        kc = k[None].float()
        mask = torch.zeros(Hkv, Tq, L, dtype=torch.bool)
        if Tq > 1:  # prefill (whole prompt, or a chunk at the end of the cache)
            assert self.state.get(li) is None or Tq == L
            qsl = torch.tensor([0, Tq], dtype=torch.int32)
            qb_req, qb_start, qb_len, qb_pos0 = make_query_blocks(qsl, torch.tensor([L], dtype=torch.int32),
                                                                  cfg.block_size_q)
            if self.last_row_block:
                qb_req, qb_start, qb_len, qb_pos0 = split_last_row(qb_req, qb_start, qb_len, qb_pos0)
            ws = window_starts(qb_pos0, cfg.sliding_window, bk)
            idx = self.mask_fn(q.float(), kc, bt, qb_req, qb_start, qb_len, ws, n_select=cfg.n_select,
                                     block_size_q=cfg.block_size_q, block_size_k=bk,
                                     sink_tokens=cfg.sink_tokens, query_stride=cfg.query_stride)
            for b in range(qb_req.shape[0]):
                s, ln, p0, w = int(qb_start[b]), int(qb_len[b]), int(qb_pos0[b]), int(ws[b])
                mask[:, s: s + ln, : p0 + ln] = allowed_keys(p0 + ln, w, cfg.sink_tokens, idx[b], bk)[:, None]
            causal = torch.ones(Tq, L, dtype=torch.bool).tril(L - Tq)
            mask &= causal[None]
            self.state[li] = None  # prefill invalidates the decode mask
        else:  # decode step
            st = self.state.get(li)
            R = cfg.mask_refresh_interval
            first = L if st is None else st[3]  # length at the first decode step
            if st is None or not (L > st[0] and L // R == st[0] // R
                                  and L - first >= cfg.mask_refresh_first_steps):  # as vllm_hip.mask_state
                w = max(0, (L - 1 - cfg.sliding_window) // bk * bk)
                one = torch.ones(1, dtype=torch.int32)
                idx = self.mask_fn(q.float(), kc, bt, one * 0, one * 0, one, torch.tensor([w], dtype=torch.int32),
                                         n_select=cfg.n_select, block_size_q=cfg.block_size_q, block_size_k=bk,
                                         sink_tokens=cfg.sink_tokens, query_stride=cfg.query_stride)
                st = self.state[li] = (L, w, idx[0], first)
            mask[:, 0, :] = allowed_keys(L, st[1], cfg.sink_tokens, st[2], bk)
        m = mask.repeat_interleave(G, 0)[None]  # [1, Hq, Tq, L]
        kk = key.repeat_interleave(G, 1)
        vv = value.repeat_interleave(G, 1)
        o = torch.nn.functional.scaled_dot_product_attention(query, kk, vv, attn_mask=m, scale=scaling)
        return o.transpose(1, 2).contiguous(), None


@torch.no_grad()
def greedy(model, input_ids: list[int], max_new: int = 8, sim: HipSim | None = None, eos=None) -> list[int]:
    """Greedy decoding with a KV cache (one prefill, then one token per step), optionally under ``sim``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ctx = sim if sim is not None else _Null()
    out = []
    with ctx:
        if sim is not None:
            sim.reset()
        ids = torch.tensor([input_ids])
        for _ in range(max_new):
            r = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = int(r.logits[0, -1].argmax())
            out.append(nxt)
            if eos is not None and nxt == eos:
                break
            ids = torch.tensor([[nxt]])
    return out


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@torch.no_grad()
def token_nll(model, input_ids: list[int], sim: HipSim | None = None, chunk: int = 1024) -> torch.Tensor:
    """Negative log-likelihood of tokens 1..T-1 given their prefix (one prefill), optionally under ``sim``."""
    ctx = sim if sim is not None else _Null()
    with ctx:
        if sim is not None:
            sim.reset()
        h = model.model(input_ids=torch.tensor([input_ids]), use_cache=False).last_hidden_state[0]
    tgt = torch.tensor(input_ids[1:])
    out = []
    for s in range(0, len(input_ids) - 1, chunk):
        logits = model.lm_head(h[s: min(s + chunk, len(input_ids) - 1)]).float()
        out.append(torch.nn.functional.cross_entropy(logits, tgt[s: s + chunk], reduction="none"))
    return torch.cat(out)


def ppl(nll: torch.Tensor, start: int = 0) -> float:
    """Perplexity of the predictions of tokens ``start+1 ..`` (``nll[i]`` predicts token ``i+1``)."""
    return float(torch.exp(nll[start:].double().mean()))


def split_last_row(qb_req, qb_start, qb_len, qb_pos0):
    """Query blocks with the last row of the batch cut out of its block into a block of its own (one request)."""
    if int(qb_len[-1]) <= 1:
        return qb_req, qb_start, qb_len, qb_pos0
    last = qb_len.clone()
    last[-1] -= 1
    one = torch.ones(1, dtype=qb_len.dtype)
    return (torch.cat([qb_req, qb_req[-1:]]), torch.cat([qb_start, qb_start[-1:] + last[-1:]]),
            torch.cat([last, one]), torch.cat([qb_pos0, qb_pos0[-1:] + last[-1:]]))
