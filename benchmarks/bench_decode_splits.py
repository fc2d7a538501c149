"""Decode attention of one Llama-3.1-8B layer as vLLM's captured decode graphs run it: padded batches (6 requests in
the graph of 8), the engine's HiP budget, and the split-K count ``hip_attention`` picks against the others.

Why: a decode step of 6 x 128K replays the graph of 8, so 2 of the 8 rows are padding (length 0, no keys). The split
count was tuned at 6 rows (sweep_prefill.py), and bench_dense_decode.py saw our dense kernel 1.65x slower with the
2 padding rows than without them. Three parts:
  * sparse: HiP decode attention (k 1024, block 8, window 2048, sink 128: 3,200 keys per row and head) over a mask
    from ``hip_mask``, at (requests, graph rows) = (1, 1), (6, 8), (16, 16), by split count and pipeline stages;
  * dense (``--dense``): rows at or below ``hip.dense_below_seq_len`` in graphs of 2-8: FlashAttention-3 as the
    backend's hand-over calls it (static ``max_seqlen_k`` 16K, ``fa_decode_splits``) against our kernel reading
    every key, for whether the hand-over pays in small graphs;
  * mask (``--mask``): a decode layer's mask launches in the staged refresh (whole search, exact-only over stored
    groups, idle; every row or one row refreshing). At c11511a this part also compared the rounds' top-n settling
    1, 2 or 4 threshold bits per pass (1 was the fastest; the others were removed).
Each variant's output is compared with the default's (max abs difference), so a fast wrong variant cannot win.

Usage (GPU; ``--dense`` needs vLLM on PYTHONPATH):
``python benchmarks/bench_decode_splits.py [--dense] [--mask] [--log F]``.
"""
import argparse
import datetime
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.reference import make_query_blocks, mask_group_width, window_starts  # noqa: E402
from kernels.triton_hip import hip_attention, hip_mask  # noqa: E402
from vllm_hip.config import HipConfig  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
DT = torch.bfloat16
MAX_MODEL_LEN = 131344
LOG = []


def log(s=""):
    print(s, flush=True)
    LOG.append(s)


def us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3


def batch(kv_blocks, T, B, rows, g, dev):
    """Block table, lengths, queries and decode query blocks of ``B`` requests of ``T`` tokens padded to ``rows``."""
    nb = -(-T // PAGE)
    bt = torch.zeros(rows, -(-MAX_MODEL_LEN // PAGE), dtype=torch.int32)
    for r in range(B):
        bt[r, :nb] = torch.randperm(kv_blocks, generator=g)[:nb]
    seq = torch.tensor([T] * B + [0] * (rows - B), dtype=torch.int32)
    q = torch.randn(rows, HQ, D, generator=g).to(dev, DT)
    bt, seq = bt.to(dev), seq.to(dev)
    qb = [t.clone() for t in make_query_blocks(torch.arange(rows + 1, dtype=torch.int32, device=dev), seq, 1)]
    qb[2][B:] = 0  # padding rows of a captured batch: no query, as the decode plan writes them
    return bt, seq, q, qb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--splits", default="2,3,4,5,6,7,8,9,10,11,12,16")
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--mask", action="store_true")
    ap.add_argument("--dense-lengths", default="4096,8192,16384")
    ap.add_argument("--log", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    log(f"# bench_decode_splits {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  GPU: {props.name} "
        f"({props.multi_processor_count} SMs)  torch {torch.__version__}  triton {triton.__version__}")
    cfg = HipConfig.from_dict({"k": 1024, "block_size_k": 8, "sliding_window": 2048})
    mk = dict(cfg.mask_kwargs, block_size_q=1, query_stride=1)
    g = torch.Generator(device="cpu").manual_seed(0)
    lengths = [int(x) for x in a.lengths.split(",")]
    kv_blocks = max(lengths) * 16 // PAGE + 8  # 16 requests of the longest length
    kv = torch.randn(kv_blocks, PAGE, HKV, 2 * D, generator=g).to(dev, DT)  # vLLM's layout: K and V per token
    kc, vc = kv[..., :D], kv[..., D:]
    scale = D ** -0.5
    splits = [int(x) for x in a.splits.split(",")]
    for T in lengths:
        for B, rows in ((1, 1), (6, 8), (16, 16)):
            bt, seq, q, qb = batch(kv_blocks, T, B, rows, g, dev)
            ws = window_starts(qb[3], cfg.sliding_window, cfg.block_size_k)
            idx = hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, active=qb[2], **mk)
            out = torch.empty_like(q)
            ak = dict(sink_tokens=cfg.sink_tokens, block_size_k=cfg.block_size_k, scale=scale, out=out)
            keys = cfg.sink_tokens + cfg.sliding_window + cfg.k
            gb = B * HKV * keys * 2 * D * 2 / 1e9
            t0 = us(lambda: hip_attention(q, kc, vc, bt, seq, *qb, ws, idx, **ak))
            ref = out[:B].float().clone()
            res = [(t0, "default")]
            for s in splits:
                for st in (2, 3):
                    t = us(lambda: hip_attention(q, kc, vc, bt, seq, *qb, ws, idx, num_splits=s, num_stages=st, **ak))
                    err = (out[:B].float() - ref).abs().max().item()
                    res.append((t, f"S={s} stages={st} (err {err:.1e})"))
            best = sorted(res)[:6]
            log(f"sparse T={T} B={B} rows={rows} ({gb * 1e3:.1f} MB, floor {gb / 4.8e3 * 1e6:.1f} us at 4.8 TB/s): "
                f"default {t0:.1f} us; fastest: " + "; ".join(f"{n} {t:.1f}" for t, n in best))
            log("  all: " + ", ".join(f"{n.split(' (')[0]} {t:.1f}" for t, n in res))
    if a.dense:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        from vllm_hip.backend import fa_decode_splits

        for T in [int(x) for x in a.dense_lengths.split(",")]:
            for B, rows in ((2, 2), (3, 4), (4, 4), (6, 8), (8, 8)):
                bt, seq, q, qb = batch(kv_blocks, T, B, rows, g, dev)
                out = torch.empty_like(q)
                cu = torch.arange(rows + 1, dtype=torch.int32, device=dev)
                fs = fa_decode_splits(rows, HKV, props.multi_processor_count)
                t_fa = us(lambda: flash_attn_varlen_func(q, kc, vc, 1, cu, 16384, seqused_k=seq, causal=True,
                                                         block_table=bt, out=out, softmax_scale=scale, num_splits=fs,
                                                         fa_version=3))
                ref = out[:B].float().clone()
                zeros = torch.zeros_like(qb[0])
                nidx = torch.full((rows, HKV, 1), -1, dtype=torch.int32, device=dev)
                own = dict(sink_tokens=0, block_size_k=1, scale=scale, out=out)
                res = []
                for s in [None] + splits:
                    t = us(lambda: hip_attention(q, kc, vc, bt, seq, *qb, zeros, nidx, num_splits=s, **own))
                    err = (out[:B].float() - ref).abs().max().item()
                    res.append((t, f"ours S={s or 'default'} (err {err:.1e})"))
                best = sorted(res)[:4]
                log(f"dense T={T} B={B} rows={rows}: FA3 hand-over (splits {fs}) {t_fa:.1f} us; ours default "
                    f"{res[0][0]:.1f}; fastest ours: " + "; ".join(f"{n} {t:.1f}" for t, n in best))
    if a.mask:
        for T in lengths:
            for B, rows in ((1, 1), (6, 8), (16, 16)):
                bt, seq, q, qb = batch(kv_blocks, T, B, rows, g, dev)
                ws = window_starts(qb[3], cfg.sliding_window, cfg.block_size_k)
                n = mk["n_select"]
                idx = torch.full((rows, HKV, n), -1, dtype=torch.int32, device=dev)
                rows_ = torch.arange(rows, dtype=torch.int32, device=dev)
                groups = tuple(torch.zeros((rows, HKV, mask_group_width(n)), dtype=torch.int32, device=dev)
                               for _ in range(2))
                real = (torch.arange(rows, device=dev) < B).to(torch.int8)
                act = {"every row": real, "one row": (torch.arange(rows, device=dev) == 0).to(torch.int8),
                       "idle": torch.zeros_like(real)}
                coarse = {c: torch.full((rows,), c, dtype=torch.bool, device=dev) for c in (0, 1)}

                def run(who, c):
                    hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx, out_row=rows_, active=act[who],
                             groups=groups, coarse=coarse[c], **mk)
                res = []
                for who, c in (("every row", 1), ("every row", 0), ("one row", 1), ("one row", 0), ("idle", 0)):
                    run("every row", 1)  # the whole search stores the groups the exact-only refresh reads
                    kind = "whole search" if c else "exact-only" if who != "idle" else "no refresh"
                    res.append(f"{kind} {who} {us(lambda: run(who, c)):.1f}")
                log(f"mask T={T} B={B} rows={rows} us: " + "; ".join(res))
    if a.log:
        with open(a.log, "w") as f:
            f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
