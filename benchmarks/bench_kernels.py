"""HiP kernels vs dense attention, one layer of Llama-3.1-8B (32 q heads, 8 kv heads, head 128, bf16).

Decode (batch 1 and 16): mask-refresh step = hip_mask + hip_attention; reuse step = hip_attention only.
Prefill (one request, whole prompt in one chunk): hip_mask + hip_attention.
Dense baselines: vLLM's FA3 ``flash_attn_varlen_func`` (paged for decode, contiguous for prefill, as
``shared/gpu-kit/dense_baseline.py``) when importable, torch SDPA prefill, and our own kernel in dense mode
(``hip_attention`` with window_start 0). Times: CUDA-graph replay (``triton.testing.do_bench_cudagraph``), median,
for every decode op (HiP and dense alike); prefill with ``do_bench`` / events. Achieved bandwidth is
bytes that must move (K+V rows attended, K rows scored by the mask search) over time, against a measured
device-to-device copy ceiling. Usage: ``python benchmarks/bench_kernels.py [--log FILE] [--bk 8] [--quick]``.
"""
import argparse
import datetime
import math
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.reference import make_query_blocks, mask_group_width, search_schedule, window_starts  # noqa: E402
from kernels.triton_hip import hip_attention, hip_mask, kv_write  # noqa: E402
from vllm_hip.config import HipConfig  # noqa: E402  (the defaults the backend runs with; imports no vLLM)

try:
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    HAVE_FA = True
except Exception:  # noqa: BLE001
    HAVE_FA = False

HQ, HKV, D, PAGE = 32, 8, 128, 16
K_TOK, SINK, WINDOW = 2048, 128, 1024
DT = torch.bfloat16
dev = "cuda"
LOG = []


def log(s=""):
    print(s, flush=True)
    LOG.append(s)


def bench_graph(fn):
    fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001
        log(f"  (graph capture failed: {type(e).__name__}: {str(e)[:80]}; plain do_bench)")
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def bench_plain(fn, reps=None):
    fn()
    torch.cuda.synchronize()
    if reps is None:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return sorted(ts)[len(ts) // 2]


def copy_ceiling():
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    us = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=100, return_mode="median") * 1e3
    del x, y
    return 2 * 2 * 1024**3 / (us * 1e-6) / 1e9


def kv_bytes(tokens):
    return tokens * HKV * D * 2 * 2  # K and V, bf16


def search_reads(count: int, n: int, exact: int, bk: int) -> tuple[int, int]:
    """Launches of the decode search over ``count`` candidate blocks and the keys it reads per head: each
    halving round scores 2n centre blocks; the exact round (groups still wider than one block) scores every
    block of the n surviving groups (about n x group size)."""
    rounds, size = search_schedule(count, n, exact)
    return rounds + (size > 1), (rounds * 2 * n + (n * size if size > 1 else 0)) * bk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--log", default=None)
    ap.add_argument("--bk", type=int, default=8)
    ap.add_argument("--bq", type=int, default=64)
    ap.add_argument("--stride", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lengths", default="8192,32768,131072,524288,1048576")
    ap.add_argument("--prefill-max", type=int, default=1048576)
    ap.add_argument("--extra-bk", default="")
    ap.add_argument("--exact-blocks", type=int, default=HipConfig().mask_exact_blocks,
                    help="hip.mask_exact_blocks (default: the backend's); 1 = plain v3 halving to single blocks")
    ap.add_argument("--norm-window", type=int, default=HipConfig().mask_kwargs["norm_window"],
                    help="the mask's normalised score over sink + this many window keys (default: the backend's; "
                         "0 = raw score). Every mask row also times the raw score, same run")
    ap.add_argument("--fa3-from", default=None, help="earlier bench log: take FA3 times from it when FA3 is absent")
    ap.add_argument("--sweep", action="store_true", help="also sweep split-K (decode) and block_n (prefill)")
    ap.add_argument("--idle-sweep", action="store_true",
                    help="decode: the mask refreshing and idle (no refresh) by programs per (request, head)")
    ap.add_argument("--pdl-sweep", action="store_true",
                    help="decode: one HiP layer's launches (KV write, mask, attention) with programmatic dependent "
                         "launch off and on, refreshing, exact-only (staged) and idle; exact-only by programs")
    ap.add_argument("--table-tokens", type=int, default=131072 + 272,
                    help="--idle-sweep: block-table width in tokens (vLLM's max_model_len; sets the static rounds)")
    ap.add_argument("--decode-batches", default="1,16", help="decode batch sizes (6: the engine's 128K point)")
    args = ap.parse_args()
    bk, bq, stride = args.bk, args.bq, args.stride
    n = K_TOK // bk
    props = torch.cuda.get_device_properties(0)
    log(f"# bench_kernels  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  GPU: {props.name} "
        f"({props.multi_processor_count} SMs)  torch {torch.__version__}  triton {triton.__version__}  FA3: {HAVE_FA}")
    log(f"# Llama-3.1-8B layer: Hq={HQ} Hkv={HKV} D={D} bf16, page {PAGE}; HiP k={K_TOK} (bk={bk}, n={n}, exact {args.exact_blocks}, norm window {args.norm_window}), "
        f"sink={SINK}, window={WINDOW}; prefill bq={bq}, query_stride={stride}; decode mask bq=1")
    ceil = copy_ceiling()
    log(f"# copy ceiling (device-to-device, read+write): {ceil:.0f} GB/s")
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    fa3_prev = {}
    if args.fa3_from and not HAVE_FA:
        import re

        for line in open(args.fa3_from):
            m = re.match(r"decode T=\s*(\d+) B=\s*(\d+) bk=\s*\d+:.*dense FA3\s+([\d.]+) us", line)
            if m:
                fa3_prev[("d", int(m[1]), int(m[2]))] = float(m[3])
            m = re.match(r"prefill T=\s*(\d+):.*\| FA3\s+([\d.]+) ms", line)
            if m:
                fa3_prev[("p", int(m[1]), 1)] = float(m[2]) * 1e3
        log(f"# FA3 absent here: FA3 times taken from {args.fa3_from} (same GPU kind, same shapes, earlier run)")
    torch.manual_seed(0)
    maxT = max(lengths)
    nblk_all = maxT // PAGE
    kc = torch.randn(nblk_all, PAGE, HKV, D, device=dev, dtype=DT)
    vc = torch.randn_like(kc)
    scale = D**-0.5

    def decode_case(T, B, bk_, tag=""):
        n_ = K_TOK // bk_
        nblk = T // PAGE
        bt = torch.stack([torch.randperm(nblk_all, device=dev, dtype=torch.int32)[:nblk] for _ in range(B)])
        q = torch.randn(B, HQ, D, device=dev, dtype=DT)
        seq = torch.full((B,), T, device=dev, dtype=torch.int32)
        qsl = torch.arange(B + 1, device=dev, dtype=torch.int32)
        qb = make_query_blocks(qsl, seq, 1)
        ws = window_starts(qb[3], WINDOW, bk_)
        idx = torch.full((B, HKV, n_), -1, dtype=torch.int32, device=dev)
        out = torch.empty_like(q)
        mk = dict(n_select=n_, block_size_q=1, block_size_k=bk_, sink_tokens=SINK, query_stride=1,
                  exact_blocks=args.exact_blocks, norm_window=args.norm_window)
        ak = dict(sink_tokens=SINK, block_size_k=bk_, scale=scale)

        def refresh():
            hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx, **mk)
            hip_attention(q, kc, vc, bt, seq, *qb, ws, idx, out=out, **ak)

        def mask_only():
            hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx, **mk)

        def reuse():
            hip_attention(q, kc, vc, bt, seq, *qb, ws, idx, out=out, **ak)

        t_ref = bench_graph(refresh)
        t_mask = bench_graph(mask_only)
        t_mask_raw = bench_graph(lambda: hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx,
                                                  **dict(mk, norm_window=0)))
        t_reuse = bench_graph(reuse)
        sel = int((idx[0, 0] >= 0).sum())
        attended = min(SINK, int(ws[0])) + (T - int(ws[0])) + sel * bk_
        rounds, mask_keys = search_reads(max(0, int(ws[0]) // bk_ - SINK // bk_), n_, args.exact_blocks, bk_)
        b_att = B * kv_bytes(attended)
        b_mask = B * mask_keys * HKV * D * 2
        t_fa = float("nan")
        if HAVE_FA:
            cu = torch.arange(B + 1, device=dev, dtype=torch.int32)
            t_fa = bench_graph(lambda: flash_attn_varlen_func(
                q, kc, vc, 1, cu, T, seqused_k=seq, causal=True, block_table=bt, out=out, fa_version=3,
                softmax_scale=scale))
        zeros = torch.zeros_like(qb[0])
        nidx = torch.full((B, HKV, 1), -1, dtype=torch.int32, device=dev)
        t_own = bench_graph(lambda: hip_attention(q, kc, vc, bt, seq, *qb, zeros, nidx, out=out, sink_tokens=0,
                                                  block_size_k=1, scale=scale))
        if not HAVE_FA and ("d", T, B) in fa3_prev:
            t_fa = fa3_prev[("d", T, B)]
        dense = t_fa if t_fa == t_fa else t_own
        rows.append((T, B, bk_, t_ref, t_mask, t_reuse, t_fa, t_own))
        if args.sweep and B in (1, 6) and T in (131072, 1048576) and not tag:
            res = []
            for S in (4, 8, 16, 32, 64):
                res.append(f"S={S}: {bench_graph(lambda: hip_attention(q, kc, vc, bt, seq, *qb, ws, idx, out=out, num_splits=S, **ak)):.1f}")
            res.append(f"single-launch mask: {bench_graph(lambda: hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx, single_launch=True, **mk)):.1f}")
            log(f"  sweep T={T} B={B} reuse us by num_splits: " + ", ".join(res))
            res = [f"{p}: {bench_graph(lambda: hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx, programs=p, **mk)):.1f}"
                   for p in (8, 16, 32, 64, 128)]
            log(f"  sweep T={T} B={B} mask us by programs per (request, head): " + ", ".join(res))
        if args.idle_sweep and not tag:
            # The mask launches of a decode step without refreshes (every query block inactive) find no work but
            # still launch; in vLLM the block table is as wide as max_model_len, which sets the number of rounds.
            wide = torch.zeros(B, max(nblk, args.table_tokens // PAGE), dtype=torch.int32, device=dev)
            wide[:, :nblk] = bt
            act = {a: torch.full((B,), a, dtype=torch.int8, device=dev) for a in (0, 1)}
            res = []
            for p in (None, 4, 8, 16, 32, 64):
                t = [bench_graph(lambda: hip_mask(q, kc, wide, qb[0], qb[1], qb[2], ws, out=idx, active=act[a],
                                                  programs=p, **mk)) for a in (1, 0)]
                res.append(f"{p or 'auto'}: {t[0]:.1f} / {t[1]:.1f}")
            log(f"  idle sweep T={T} B={B} table {args.table_tokens} tokens: mask us refreshing / idle (no refresh) "
                f"by programs per (request, head): " + ", ".join(res))
        if args.pdl_sweep and not tag:
            # One HiP layer of a decode step as vLLM's graph replays it (block table as wide as max_model_len):
            # KV write, the mask's launches (refreshing every row, exact-only over stored groups, or idle),
            # attention. PDL off and on.
            wide = torch.zeros(B, max(nblk, args.table_tokens // PAGE), dtype=torch.int32, device=dev)
            wide[:, :nblk] = bt
            act = {a: torch.full((B,), a, dtype=torch.int8, device=dev) for a in (0, 1)}
            rows_ = torch.arange(B, dtype=torch.int32, device=dev)
            width = mask_group_width(n_)
            groups = tuple(torch.zeros((B, HKV, width), dtype=torch.int32, device=dev) for _ in range(2))
            coarse = {c: torch.full((B,), c, dtype=torch.bool, device=dev) for c in (0, 1)}
            knew = torch.randn(B, HKV, D, device=dev, dtype=DT)
            slots = (wide[:, nblk - 1].long() * PAGE + PAGE - 1).contiguous()
            hip_mask(q, kc, wide, qb[0], qb[1], qb[2], ws, out=idx, out_row=rows_, active=act[1], groups=groups,
                     coarse=coarse[1], **mk)  # fills the group caches the exact-only refreshes read

            def layer(a, c, pdl, programs=None):
                def run():
                    kv_write(knew, knew, kc, vc, slots, pdl=pdl)
                    hip_mask(q, kc, wide, qb[0], qb[1], qb[2], ws, out=idx, out_row=rows_, active=act[a],
                             groups=groups, coarse=coarse[c], programs=programs, pdl=pdl, **mk)
                    hip_attention(q, kc, vc, wide, seq, *qb, ws, idx, out=out, pdl=pdl, **ak)
                return bench_graph(run)

            res = []
            for pdl in (False, True):
                res.append(f"PDL {'on' if pdl else 'off'}: whole search {layer(1, 1, pdl):.1f}, exact-only "
                           f"{layer(1, 0, pdl):.1f}, idle {layer(0, 0, pdl):.1f}")
            log(f"  pdl sweep T={T} B={B} table {args.table_tokens} tokens: one layer's launches (kv write, mask, "
                f"attention), us: " + "; ".join(res))
            res = [f"{p or 'auto'}: {layer(1, 0, True, p):.1f}" for p in (None, 8, 16, 32, 64)]
            log(f"  pdl sweep T={T} B={B}: exact-only layer us by mask programs per (request, head), PDL on: "
                + ", ".join(res))
        log(f"decode{tag} T={T:>8} B={B:>2} bk={bk_:>2}: refresh {t_ref:8.1f} us (mask {t_mask:7.1f}, {rounds} rounds,"
            f" {b_mask / t_mask / 1e3:5.0f} GB/s; raw score {t_mask_raw:7.1f}) | reuse {t_reuse:7.1f} us ({b_att / t_reuse / 1e3:5.0f} GB/s) | "
            f"dense FA3 {t_fa:8.1f} us ({B * kv_bytes(T) / t_fa / 1e3:5.0f} GB/s), "
            f"ours-dense {t_own:8.1f} us ({B * kv_bytes(T) / t_own / 1e3:5.0f} GB/s) | speedup refresh "
            f"{dense / t_ref:5.1f}x reuse {dense / t_reuse:5.1f}x")

    log("\n## decode")
    for T in lengths:
        for B in [int(x) for x in args.decode_batches.split(",")]:
            if B * T * 0 + T > maxT:
                continue
            decode_case(T, B, bk)
    for ebk in [int(x) for x in args.extra_bk.split(",") if x]:
        for T in (131072, 1048576):
            if T <= maxT:
                decode_case(T, 1, ebk, tag=" (alt bk)")

    log("\n## prefill (one request, whole prompt)")
    fa_rate = None
    for T in lengths:
        if T > args.prefill_max:
            continue
        nblk = T // PAGE
        bt = torch.randperm(nblk_all, device=dev, dtype=torch.int32)[:nblk][None]
        q = torch.randn(T, HQ, D, device=dev, dtype=DT)
        seq = torch.tensor([T], device=dev, dtype=torch.int32)
        qsl = torch.tensor([0, T], device=dev, dtype=torch.int32)
        qb = make_query_blocks(qsl, seq, bq)
        ws = window_starts(qb[3], WINDOW, bk)
        QB = qb[0].shape[0]
        idx = torch.full((QB, HKV, n), -1, dtype=torch.int32, device=dev)
        out = torch.empty_like(q)
        mk = dict(n_select=n, block_size_q=bq, block_size_k=bk, sink_tokens=SINK, query_stride=stride,
              exact_blocks=args.exact_blocks, norm_window=args.norm_window)
        ak = dict(sink_tokens=SINK, block_size_k=bk, scale=scale, block_size_q=bq)
        reps = 3 if T >= 524288 else None
        t_mask = bench_plain(lambda: hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx, **mk), reps)
        t_mask_raw = bench_plain(lambda: hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx,
                                                  **dict(mk, norm_window=0)), reps)
        t_att = bench_plain(lambda: hip_attention(q, kc, vc, bt, seq, *qb, ws, idx, out=out, **ak), reps)
        # attended keys (exact count, from the mask) -> FLOPs of the sparse attention
        wsl = ws.long()
        p0 = qb[3].long()
        ln = qb[2].long()
        nsel = (idx >= 0).sum(-1).double().mean(-1)  # [QB]
        keys_per_row = (torch.clamp(wsl, max=SINK).double() + (p0 - wsl).double() + nsel * bk)[:, None] + \
            torch.arange(bq, device=dev).double()[None] + 1
        keys_per_row = torch.where(torch.arange(bq, device=dev)[None] < ln[:, None], keys_per_row, 0.0)
        flops_hip = float(4 * keys_per_row.sum() * D * HQ)
        flops_dense = 4 * T * (T + 1) / 2 * D * HQ
        t_fa = t_sdpa = t_own = float("nan")
        if T <= 131072:
            if HAVE_FA:
                k = torch.randn(T, HKV, D, device=dev, dtype=DT)
                v = torch.randn_like(k)
                cu = torch.tensor([0, T], device=dev, dtype=torch.int32)
                t_fa = bench_plain(lambda: flash_attn_varlen_func(q, k, v, T, cu, T, cu_seqlens_k=cu, causal=True,
                                                                  out=out, fa_version=3, softmax_scale=scale))
                fa_rate = flops_dense / (t_fa * 1e-6)
                del k, v
            qs = q.transpose(0, 1).unsqueeze(0)
            ks = torch.randn(1, HQ, T, D, device=dev, dtype=DT)
            vs = torch.randn_like(ks)
            t_sdpa = bench_plain(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
            del ks, vs
            zeros = torch.zeros_like(qb[0])
            nidx = torch.full((QB, HKV, 1), -1, dtype=torch.int32, device=dev)
            t_own = bench_plain(lambda: hip_attention(q, kc, vc, bt, seq, *qb, zeros, nidx, out=out, sink_tokens=0,
                                                      block_size_k=1, scale=scale, block_size_q=bq))
        if args.sweep and T == 32768:
            res = []
            for bn in (32, 64, 128):
                for nw in (4, 8):
                    try:
                        tt = bench_plain(lambda: hip_attention(q, kc, vc, bt, seq, *qb, ws, idx, out=out, block_n=bn,
                                                               **ak))
                        res.append(f"block_n={bn}: {tt / 1e3:.2f} ms")
                    except Exception as e:  # noqa: BLE001
                        res.append(f"block_n={bn}: {type(e).__name__}")
                    break
            res.append(f"single-launch mask {bench_plain(lambda: hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx, single_launch=True, **mk)) / 1e3:.2f} ms")
            log("  sweep prefill 32K attention: " + ", ".join(res))
        if not HAVE_FA and ("p", T, 1) in fa3_prev:
            t_fa = fa3_prev[("p", T, 1)]
            fa_rate = flops_dense / (t_fa * 1e-6)
        est = ""
        dense = t_fa
        if math.isnan(dense) and fa_rate:
            dense = flops_dense / fa_rate * 1e6
            est = " (FA3 estimated from FLOPs at the 128K rate)"
        elif math.isnan(dense):
            dense = t_sdpa
        t_tot = t_mask + t_att
        log(f"prefill T={T:>8}: HiP {t_tot / 1e3:9.2f} ms (mask {t_mask / 1e3:8.2f} ms, raw score"
            f" {t_mask_raw / 1e3:8.2f} ms, attention {t_att / 1e3:8.2f} ms,"
            f" {flops_hip / (t_att * 1e-6) / 1e12:5.0f} TFLOP/s) | FA3 {t_fa / 1e3:9.2f} ms, SDPA {t_sdpa / 1e3:9.2f} ms,"
            f" ours-dense {t_own / 1e3:9.2f} ms ({flops_dense / (t_own * 1e-6) / 1e12 if t_own == t_own else 0:4.0f}"
            f" TFLOP/s) | speedup {dense / t_tot:6.1f}x{est}")
        del q, out, idx
        torch.cuda.empty_cache()
    if args.log:
        with open(args.log, "w") as f:
            f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
