"""Decode quality of the staged refresh (``hip.mask_coarse_interval``) against plain refresh intervals, simulated on
Q/K/V captured from Qwen2.5-Coder-0.5B at 32K tokens (CPU).

At 8K SmolLM2's search has no halving round for the staged refresh to skip, so this needs the 32K model
(``assets.qwen_dir``, built on demand). One capture, then ``quality_lib.decode_metrics`` per configuration: the last
``--steps`` positions as one-token decode queries (teacher forcing), masks refreshed and reused as the backend does
(first steps 1, so every interval is in its steady state). Prints one JSON line per configuration: decode output
error against dense, attention mass kept, top-k recall, means over the HiP layers.

    python benchmarks/staged_refresh_quality.py [--tokens 32000] [--steps 64] [--configs "interval 8;interval 8, coarse 64"]

CPU time: ~15 min for the capture at 32K on 2 cores, ~20-60 s per configuration.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import assets  # noqa: E402
import quality_lib as ql  # noqa: E402

# Plain intervals name coarse 0 explicitly: unset, mask_coarse_interval follows the interval (HipConfig), so
# {"mask_refresh_interval": 16} alone would be a staged refresh too.
CONFIGS = [("interval 8", {"mask_coarse_interval": 0}),
           ("interval 16", {"mask_refresh_interval": 16, "mask_coarse_interval": 0}),
           ("interval 8, coarse 32", {"mask_coarse_interval": 32}),
           ("interval 8, coarse 16", {"mask_coarse_interval": 16}),
           ("interval 1", {"mask_refresh_interval": 1, "mask_coarse_interval": 0}),
           ("interval 8, coarse 64", {"mask_coarse_interval": 64})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--offset", type=int, default=60000, help="token offset into the plays")
    ap.add_argument("--configs", default="", help="config names to run, separated by ';' (default: all)")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    path = str(assets.qwen_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = ql.text_ids(tok, assets.plays_text(), a.tokens, offset=a.offset)
    caps = ql.capture_qkv(model, ids)
    del model
    print(f"captured {len(caps)} layers of {a.tokens} tokens in {time.time() - t0:.0f} s", flush=True)
    wanted = [c.strip() for c in a.configs.split(";") if c.strip()]
    for name, extra in CONFIGS:
        if wanted and name not in wanted:
            continue
        cfg = ql._cfg(dict({"mask_refresh_first_steps": 1}, **extra))
        t1 = time.time()
        ms = [ql.decode_metrics(c["q"], c["k"], c["v"], c["scale"], cfg, steps=a.steps) for i, c in enumerate(caps)
              if i not in cfg.dense_layers]
        row = {k: round(sum(m[k] for m in ms) / len(ms), 4) for k in ("rel_l2", "mass", "recall_all")}
        print(json.dumps({"config": name, "hip": extra, **row, "layers": len(ms), "s": round(time.time() - t1)}),
              flush=True)


if __name__ == "__main__":
    main()
