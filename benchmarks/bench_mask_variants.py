"""Which key-block selection would fix HiP's long passkey misses? SmolLM2-135M in transformers (CPU), HiP
simulated by ``quality_lib.HipSim`` with the mask function swapped (``mask_variants.py``):

* ``dense``: no HiP;
* ``v3``: our algorithm (``kernels/reference.py``, what the backend runs);
* ``staged``: InfiniteHiP-style staged search (chunks of 256 tokens keep 16k tokens, chunks of 32 keep 4k);
* ``oracle``: the exact top-n blocks under HiP's block score (the ceiling of any selection with this budget);
* ``oracle_norm``: the same under a per-head normalised score; ``v3_last``: v3 with the prompt's last row in a
  query block of its own.
* ``summary``: whole 16-token pages ranked by max/min key summaries (``mask_variants.mask_summary``, on the
  normalised score when the config uses it).
* ``shortlist``: the summaries shortlist ``--shortlist`` x the selection's blocks, an exact stage keeps the best.

    python benchmarks/bench_mask_variants.py --lengths 8000 --depths 0.25,0.75,1.0 --seeds 0,1

Same passkey prompts as ``bench_quality.py vllm`` (same seeds and haystack offsets); perplexity on the plays.
Prints a table per length (fraction right over seeds x depths, and right where dense is right) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8000")
    ap.add_argument("--depths", default="0.25,0.75,1.0")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--variants", default="dense,v3,staged,oracle")
    ap.add_argument("--hip", default="{}", help="HipConfig JSON (defaults otherwise)")
    ap.add_argument("--stages", default=None, help='staged search as JSON [[chunk_tokens, keep_tokens], ...] '
                    '(default [[256, 16k], [32, 4k]] with k = hip.k)')
    ap.add_argument("--only", default=None, help="run only these prompts of the grid, as seed:depth,... (the "
                    "prompts stay those of the full --depths list)")
    ap.add_argument("--shortlist", type=float, default=4.0,
                    help="shortlist variant: blocks the summaries shortlist, in multiples of the selection")
    ap.add_argument("--ppl-length", type=int, default=0, help="also perplexity on this many tokens of the plays")
    ap.add_argument("--out", default=str(HERE / "results" / "mask_variants.json"))
    a = ap.parse_args()
    import quality_lib as ql  # first: puts the repository on sys.path

    import assets
    import mask_variants as mv
    from bench_quality import PPL_OFFSET

    from vllm_hip.config import HipConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = HipConfig.from_dict(json.loads(a.hip))
    model, tok = ql.load_smollm2()
    stages = tuple(map(tuple, json.loads(a.stages))) if a.stages else ((256, 16 * cfg.k), (32, 4 * cfg.k))
    fns = {"v3": None, "staged": partial(mv.mask_staged, stages=stages), "oracle": mv.mask_oracle, "v3_last": None,
           "oracle_norm": partial(mv.mask_oracle_norm, window=cfg.sliding_window),
           "summary": mv.mask_summary_for(cfg), "shortlist": mv.mask_summary_for(cfg, shortlist=a.shortlist)}
    lengths = [int(x) for x in a.lengths.split(",")]
    depths = [float(x) for x in a.depths.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    variants = a.variants.split(",")
    only = None if a.only is None else {(int(x.split(":")[0]), float(x.split(":")[1])) for x in a.only.split(",")}
    hay = assets.haystack_text()
    rows, ppl = [], {}
    t0 = time.time()
    for L in lengths:
        for s in seeds:
            for depth, key, prompt in ql.passkey_cases(tok, L, depths, seed=s, haystack=hay, offset=3000 * s):
                if only is not None and (s, depth) not in only:
                    continue
                ids = tok.encode(prompt)
                row = {"length": L, "seed": s, "depth": depth, "key": key, "tokens": len(ids)}
                for v in variants:
                    sim = None if v == "dense" else ql.HipSim(cfg, mask_fn=fns[v], last_row_block=v.endswith("_last"))
                    t = time.time()
                    text = tok.decode(ql.greedy(model, ids, max_new=8, sim=sim))
                    row[v] = {"ok": assets.answer_ok(text, key), "text": text, "s": round(time.time() - t, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if a.ppl_length:
        ids = ql.text_ids(tok, assets.plays_text(), a.ppl_length, offset=PPL_OFFSET)
        for v in variants:
            sim = None if v == "dense" else ql.HipSim(cfg, mask_fn=fns[v])
            ppl[v] = ql.ppl(ql.token_nll(model, ids, sim=sim))
            print(json.dumps({"ppl_length": a.ppl_length, "variant": v, "ppl": ppl[v]}), flush=True)
    out = {"hip": cfg.to_dict(), "stages": stages, "rows": rows, "ppl": ppl, "wall_s": round(time.time() - t0)}
    Path(a.out).write_text(json.dumps(out, indent=1))

    print(f"\nSmolLM2-135M passkey, HiP simulated in transformers (CPU), HipConfig {json.loads(a.hip) or 'defaults'}")
    print(f"{'length':>7} " + "".join(f"{v:>16}" for v in variants))
    for L in lengths:
        rs = [r for r in rows if r["length"] == L]
        dense_ok = [r["dense"]["ok"] for r in rs] if "dense" in variants else [True] * len(rs)
        cells = []
        for v in variants:
            right = sum(r[v]["ok"] for r in rs)
            where_dense = sum(r[v]["ok"] for r, d in zip(rs, dense_ok) if d)
            cells.append(f"{right}/{len(rs)} ({where_dense}/{sum(dense_ok)})")
        print(f"{L:>7} " + "".join(f"{c:>16}" for c in cells))
    print("cells: right / prompts (right where dense is right / dense right)")
    for v, p in ppl.items():
        print(f"perplexity {a.ppl_length} tokens, {v}: {p:.3f}" + (f" ({p / ppl['dense'] - 1:+.2%} vs dense)" if "dense" in ppl else ""))


if __name__ == "__main__":
    main()
