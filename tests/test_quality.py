"""Quality of HiP on a real model (SmolLM2-135M): passkey retrieval against the dense backend in vLLM, and a
fast per-layer check of HiP's selection on captured real Q/K/V (numbers: BENCHMARKS_quality.md).
"""
from __future__ import annotations

import pytest

from conftest import run_vllm

# ------------------------------------------------------------------------------------------- passkey
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
PASSKEY_TOKENS = 4000  # ~3980 tokens with the chat template
# HiP settings of both tests: HipConfig defaults but the window (below). block_size_k defaults to 8 (not the
# paper's 2) because of this test (BENCHMARKS.md §4): with 2, SmolLM2 answers 2/5 in vLLM where dense answers
# 5/5. Its 5-digit key is 5 single-digit tokens; a decode mask of 2-token blocks, reused for mask_refresh_interval=8
# steps, covers the next digit or two but not the rest (" 604." for 60494), and at 50 % depth the prefill mask
# of the last query block misses the key (" 1586."). With 8-token blocks one block holds the whole key: 5/5.
# The window is the one setting the tests pin below its default (2048): at the 4K tokens CI can afford, 2048 leaves
# HiP too little to select for a wrong selection to show (sink + window + k = 3,200 of 4,096), while 1024 (the
# default until 2026-12-02) keeps the prompt 1.9x the budget.
HIP_QUALITY: dict = {"sliding_window": 1024}


@pytest.fixture(scope="module")
def smollm2():
    import assets
    from transformers import AutoTokenizer

    path = str(assets.smollm2_dir())
    return path, AutoTokenizer.from_pretrained(path)


@pytest.mark.slow
def test_smollm2_passkey_matches_dense(smollm2):
    """HiP (all layers but the configured dense ones) answers the ~4K-token passkey prompt as the dense
    default backend does on at least 4 of the 5 depths where dense is right; dense must be right on >= 3."""
    import quality_lib as ql
    from assets import answer_ok
    from vllm_hip.config import HipConfig

    model, tok = smollm2
    cases = ql.passkey_cases(tok, PASSKEY_TOKENS, DEPTHS, seed=0)
    prompts = [p for _, _, p in cases]
    n_tok = [len(tok.encode(p)) for p in prompts]

    cfg = HipConfig.from_dict(HIP_QUALITY)
    # HiP really prunes here: every prompt is well beyond sink + window + k (the needle at depth 0-0.5 lies in
    # the pruned region), on every non-dense layer.
    assert cfg.dense_below_seq_len == 0 and cfg.dense_layers == (0, 1, 2)
    assert min(n_tok) > 1.5 * (cfg.sink_tokens + cfg.sliding_window + cfg.k), n_tok

    spec = {"model": model, "prompts": prompts, "max_tokens": 8, "engine": {"max_model_len": 8192}}
    dense = run_vllm({**spec, "backend": "default", "hip": None}, timeout=1800)
    hip = run_vllm({**spec, "backend": "HIP", "hip": HIP_QUALITY}, timeout=3600)

    rows = []
    for (depth, key, _), d_tok, h_tok in zip(cases, dense["tokens"], hip["tokens"]):
        d_txt, h_txt = tok.decode(d_tok), tok.decode(h_tok)
        rows.append((depth, key, answer_ok(d_txt, key), answer_ok(h_txt, key), d_txt, h_txt))
    report = "\n".join(f"depth {d:.2f} key {k}: dense {'OK' if do else 'XX'} {dt!r}, hip {'OK' if ho else 'XX'} {ht!r}"
                       for d, k, do, ho, dt, ht in rows)
    print(report, f"\ndense run {dense['run_s']} s, hip run {hip['run_s']} s")
    dense_right = [r for r in rows if r[2]]
    assert len(dense_right) >= 3, f"dense baseline right on only {len(dense_right)}/5: test is vacuous\n{report}"
    agree = sum(1 for r in dense_right if r[3])
    assert agree >= min(4, len(dense_right)), f"HiP right on {agree} of the {len(dense_right)} depths dense gets\n{report}"


# --------------------------------------------------------------- selection on captured Q/K/V (CI slice)
# Per-layer HiP (kernels/reference.py) vs dense attention on SmolLM2's real post-RoPE Q/K/V of 4096 tokens of
# the Gutenberg plays (HIP_QUALITY prunes above sink + window + k = 2176), HIP_QUALITY settings, averaged over
# the HiP layers (BENCHMARKS.md §4, "Defaults revisited").
CI_TOKENS = 4096
CI_MAX_BLOCKS = 4  # pruned query blocks scored per layer (evenly spaced, always including the last)
CI_THRESHOLDS = {
    # Measured 2026-11-30 (defaults: k 1024, block_size_k 8, mask_exact_blocks 8, window 1024, sink 128; CPU,
    # torch 2.13 fp32): block_recall 1.000, mass 0.9937, rel_l2 0.0132. Regressions measured with the same check:
    # plain v3 (mask_exact_blocks 1) 0.976 / 0.989 / 0.0168; half the budget (k=512) 1.000 / 0.988 / 0.0203;
    # window and sink only (k=8) 0.352 / 0.920 / 0.087; random key blocks 0.584 / 0.957 / 0.049. Each of them fails
    # at least one bound below. With the normalised score (default since 2026-12-01; block recall then against the
    # exact top-n under that score): 1.000 / 0.9942 / 0.0105.
    "block_recall": (">=", 0.99),  # share of the exact top-n key blocks (HiP's own block score) found
    "mass": (">=", 0.991),  # dense softmax mass on the keys HiP attends
    "rel_l2": ("<=", 0.015),  # ||o_hip - o_dense|| / ||o_dense|| on the pruned query blocks
}


@pytest.fixture(scope="module")
def captured():
    import assets
    import quality_lib as ql

    model, tok = ql.load_smollm2()
    ids = ql.text_ids(tok, assets.plays_text(), CI_TOKENS, offset=1000)
    caps = ql.capture_qkv(model, ids)
    del model
    return caps


def _mean(caps, cfg, layers=None):
    import quality_lib as ql

    cfg = ql._cfg(cfg)
    use = [i for i in (range(len(caps)) if layers is None else layers) if i not in cfg.dense_layers]
    per = [ql.layer_metrics(caps[i]["q"], caps[i]["k"], caps[i]["v"], caps[i]["scale"], cfg,
                            max_blocks=CI_MAX_BLOCKS) for i in use]
    return ql.summarize(per), per


def _check(mean) -> list[str]:
    bad = []
    for key, (op, bound) in CI_THRESHOLDS.items():
        ok = mean[key] >= bound if op == ">=" else mean[key] <= bound
        if not ok:
            bad.append(f"{key} = {mean[key]:.4f}, want {op} {bound}")
    return bad


def test_selection_quality_on_captured_qkv(captured):
    """HiP's selection on real Q/K/V keeps its measured quality: the hierarchical search finds the exact
    top key blocks, the attended keys hold the attention mass, and the output stays close to dense."""
    mean, per = _mean(captured, HIP_QUALITY)
    print({k: round(v, 4) for k, v in mean.items()})
    assert all(m["blocks"] > 0 for m in per), f"HiP must prune at {CI_TOKENS} tokens on every HiP layer"
    bad = _check(mean)
    assert not bad, f"selection quality regressed: {bad}"


def test_selection_check_catches_random_blocks(captured, monkeypatch):
    """Control: the same check fails when the hierarchical search is replaced by random key blocks."""
    import quality_lib as ql
    import torch

    def random_blocks(q, k_cache, block_table, qb_req, qb_start, qb_len, window_start, *, n_select,
                      block_size_q, block_size_k, sink_tokens, query_stride=1, exact_blocks=1, norm_window=0):
        g = torch.Generator().manual_seed(0)
        out = torch.full((qb_req.shape[0], k_cache.shape[2], n_select), -1, dtype=torch.int32)
        for b in range(qb_req.shape[0]):
            lo, hi = sink_tokens // block_size_k, int(window_start[b]) // block_size_k
            for h in range(k_cache.shape[2]):
                pick = lo + torch.randperm(hi - lo, generator=g)[:n_select]
                out[b, h, : pick.numel()] = pick.sort().values.to(torch.int32)
        return out

    monkeypatch.setattr(ql, "hip_mask_reference", random_blocks)
    mean, _ = _mean(captured, HIP_QUALITY, layers=[3, 8, 13, 18, 23, 28])
    print({k: round(v, 4) for k, v in mean.items()})
    assert _check(mean), "random key blocks pass the selection check: thresholds too loose"


def test_selection_turnover_is_zero_for_a_planted_stable_selection_and_high_for_random():
    """quality_lib.selection_turnover (benchmarks, offload analysis): four planted key blocks that every query
    prefers are selected at every refresh (turnover 0, for pages and blocks), while the random baseline of the
    same sizes turns over; with queries of no common direction the selection itself turns over."""
    import quality_lib as ql
    import torch

    g = torch.Generator().manual_seed(0)
    T, D, bk = 256, 16, 8  # ~20-27 candidate blocks in groups of <= 8: the exact stage scores every one
    cfg = {"k": 32, "block_size_k": bk, "block_size_q": 16, "sink_tokens": 8, "sliding_window": 32,
           "mask_refresh_interval": 8, "mask_exact_blocks": 8, "dense_layers": []}
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    k = torch.randn(T, 1, D, generator=g) * 0.1
    hot = [2, 7, 11, 16]  # blocks of 8 tokens in pages 1, 3, 5, 8 of 16 tokens, all below every window
    for b in hot:
        k[b * bk:(b + 1) * bk, 0] += 5 * u
    q = (torch.randn(T, 1, D, generator=g) * 0.1 + u)
    res = ql.selection_turnover(q, k, cfg, steps=64, page=16)
    assert res["refreshes"] == 8
    assert res["page_turnover"] == 0.0 and res["block_turnover"] == 0.0, res
    assert res["sel_pages"] == 4.0, res
    assert res["rand_block_turnover"] > 0.5 and res["rand_page_turnover"] > 0.3, res
    noisy = ql.selection_turnover(torch.randn(T, 1, D, generator=g), torch.randn(T, 1, D, generator=g), cfg,
                                  steps=64, page=16)
    assert noisy["block_turnover"] > 0.5, noisy
