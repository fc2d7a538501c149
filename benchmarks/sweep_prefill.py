"""Launch-knob sweep of the HiP prefill kernels at one long prompt, and the selection budgets side by side.

One Llama-3.1-8B attention layer (32 q / 8 kv heads, head 128, bf16, page 16), one request of ``--tokens`` in one
chunk, random inputs. Prints, for each HiP budget (``--budgets``: k/window pairs with the same sink):
  * prefill mask and attention ms with the wrappers' defaults, and decode mask us at batch 1 and 6 (CUDA graph);
  * with ``--sweep``: the attention by (query rows per tile, block_n, num_warps, num_stages) and the mask by
    (krows, num_warps, one launch or per round), each variant checked against the default's output (mask: same
    indices; attention: max abs difference) so a fast wrong variant cannot win;
  * the decode attention at batch 6 with and without the causal tail, and with ``--decode-att-grid`` by (block_n, warps,
    stages, split count), checked the same way.
Usage: ``python benchmarks/sweep_prefill.py [--tokens 131072] [--sweep] [--log FILE]``.
"""
import argparse
import datetime
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.reference import make_query_blocks, window_starts  # noqa: E402
from kernels.triton_hip import hip_attention, hip_mask  # noqa: E402
from vllm_hip.config import HipConfig  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
LOG = []


def log(s=""):
    print(s, flush=True)
    LOG.append(s)


def ms(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=40)


def us_graph(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3


def _report(title, top, variants):
    """Run each ``(label, trial)`` (``trial() -> (time, note)``; a variant that fails to compile or launch is listed
    by its error) and log the ``top`` fastest."""
    res = []
    for label, trial in variants:
        try:
            t, note = trial()
            res.append((t, f"{label}: {note}"))
        except Exception as e:  # noqa: BLE001
            res.append((float("inf"), f"{label}: {type(e).__name__}"))
    res.sort(key=lambda r: r[0])
    if res:
        log(title)
    for _, s in res[:top]:
        log("    " + s)


def _lists(spec):
    return [[int(x) for x in part.split(",")] for part in spec.split("/")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--budgets", default="2048/1024,1024/2048",
                    help="k/window pairs, or k/window/norm_window triples (hip.norm_window; default 0 = the window)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--att-grid", default="32,64/32,64,128/4,8/2,3,4/1",
                    help="attention sweep: rows/block_n/warps/stages/causal_tail lists")
    ap.add_argument("--mask-grid", default="16,32,64,128/4,8/1,0/0",
                    help="mask sweep: krows/warps/one-launch/stages lists (stages 0: Triton's default; one launch only)")
    ap.add_argument("--decode-grid", default="", help="decode mask sweep (B=1, 6): krows/warps lists")
    ap.add_argument("--decode-att-grid", default="",
                    help="decode attention sweep (B=6): block_n/warps/stages/splits lists, e.g. 32,64,128/2,4,8/2,3/4,8,16")
    ap.add_argument("--log", default=None)
    a = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    T = a.tokens
    props = torch.cuda.get_device_properties(0)
    log(f"# sweep_prefill {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  GPU: {props.name} "
        f"({props.multi_processor_count} SMs)  torch {torch.__version__}  triton {triton.__version__}  T={T}")
    base = HipConfig()
    torch.manual_seed(0)
    nblk = T // PAGE
    kc = torch.randn(nblk, PAGE, HKV, D, device=dev, dtype=dt)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nblk, device=dev, dtype=torch.int32)[None]
    q = torch.randn(T, HQ, D, device=dev, dtype=dt)
    seq = torch.tensor([T], device=dev, dtype=torch.int32)
    qb = make_query_blocks(torch.tensor([0, T], device=dev, dtype=torch.int32), seq, base.block_size_q)
    QB = qb[0].shape[0]
    out = torch.empty_like(q)
    scale = D**-0.5
    B6 = 6
    qd = torch.randn(B6, HQ, D, device=dev, dtype=dt)
    btd = torch.stack([torch.randperm(nblk, device=dev, dtype=torch.int32) for _ in range(B6)])
    seqd = torch.full((B6,), T, device=dev, dtype=torch.int32)
    qbd = make_query_blocks(torch.arange(B6 + 1, device=dev, dtype=torch.int32), seqd, 1)
    for budget in a.budgets.split(","):
        k, w, *nw = (int(x) for x in budget.split("/"))
        cfg = HipConfig.from_dict({"k": k, "sliding_window": w, "norm_window": nw[0] if nw else 0})
        mk = cfg.mask_kwargs
        n = mk["n_select"]
        ws = window_starts(qb[3], w, cfg.block_size_k)
        idx = torch.full((QB, HKV, n), -1, dtype=torch.int32, device=dev)
        ak = dict(sink_tokens=cfg.sink_tokens, block_size_k=cfg.block_size_k, scale=scale,
                  block_size_q=cfg.block_size_q)
        t_mask = ms(lambda: hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx, **mk))
        ref_idx = idx.clone()
        t_att = ms(lambda: hip_attention(q, kc, vc, bt, seq, *qb, ws, idx, out=out, **ak))
        ref_out = out.clone()
        dec = []
        for B in (1, B6):
            wsd = window_starts(qbd[3][:B], w, cfg.block_size_k)
            idd = torch.full((B, HKV, n), -1, dtype=torch.int32, device=dev)
            dmk = dict(mk, block_size_q=1, query_stride=1)
            dec.append(us_graph(lambda: hip_mask(qd[:B], kc, btd[:B], qbd[0][:B], qbd[1][:B], qbd[2][:B], wsd,
                                                 out=idd, **dmk)))
        # decode attention at batch 6 over the last decode mask, with and without the causal tail (CUDA graph)
        outd = torch.empty_like(qd)
        dak = dict(ak, block_size_q=1)
        datt = {ct: us_graph(lambda ct=ct: hip_attention(
                    qd, kc, vc, btd, seqd, *qbd, wsd, idd, out=outd, causal_tail=ct, **dak))
                for ct in (False, True)}
        log(f"budget k={k} window={w}: decode attention B=6 us by causal_tail: "
            + ", ".join(f"{kk}: {v:.1f}" for kk, v in datt.items()))
        if a.decode_att_grid and budget == a.budgets.split(",")[-1]:  # the same keys read whatever the budget's split
            hip_attention(qd, kc, vc, btd, seqd, *qbd, wsd, idd, out=outd, **dak)
            ref_d = outd.clone()

            def decode_att(bn, nw, ns, sp):
                outd.zero_()
                t = us_graph(lambda: hip_attention(qd, kc, vc, btd, seqd, *qbd, wsd, idd, out=outd, block_n=bn,
                                                   num_warps=nw, num_stages=ns, num_splits=sp, **dak))
                return t, f"{t:.1f} us (max err {(outd.float() - ref_d.float()).abs().max().item():.1e})"

            _report(f"  decode attention sweep B=6, fastest first (default {datt[False]:.1f} us):", 10,
                    ((f"block_n={bn} warps={nw} stages={ns} splits={sp}",
                      lambda bn=bn, nw=nw, ns=ns, sp=sp: decode_att(bn, nw, ns, sp))
                     for bn, nw, ns, sp in itertools.product(*_lists(a.decode_att_grid))))
        log(f"budget k={k} window={w} (n={n}, exact {mk['exact_blocks']}, norm window {mk['norm_window']}): "
            f"prefill mask {t_mask:.2f} ms, attention {t_att:.2f} ms, total {t_mask + t_att:.2f} ms | decode mask "
            f"B=1 {dec[0]:.1f} us, B=6 {dec[1]:.1f} us")
        if not a.sweep:
            continue
        # the attention reads sink + window + k keys whatever the split: swept once, with the last budget's mask
        grid = itertools.product(*_lists(a.att_grid)) if budget == a.budgets.split(",")[-1] else ()

        def attention(rows, bn, nw, ns, ct):
            out.zero_()
            t = ms(lambda: hip_attention(q, kc, vc, bt, seq, *qb, ws, idx, out=out, rows=rows, block_n=bn,
                                         num_warps=nw, num_stages=ns, causal_tail=bool(ct), **ak))
            return t, f"{t:.2f} ms (max err {(out.float() - ref_out.float()).abs().max().item():.1e})"

        _report(f"  attention sweep, fastest first (default {t_att:.2f} ms):", 16,
                ((f"rows={r} block_n={bn} warps={nw} stages={ns} causal_tail={ct}",
                  lambda r=r, bn=bn, nw=nw, ns=ns, ct=ct: attention(r, bn, nw, ns, ct))
                 for r, bn, nw, ns, ct in grid))

        def mask(kr, nw, one, st):
            idx.fill_(-1)
            t = ms(lambda: hip_mask(q, kc, bt, qb[0], qb[1], qb[2], ws, out=idx, krows=kr, num_warps=nw,
                                    single_launch=one, num_stages=st or None, **mk))
            return t, f"{t:.2f} ms (same indices: {torch.equal(idx, ref_idx)})"

        _report(f"  mask sweep, fastest first (default {t_mask:.2f} ms):", 10,
                ((f"krows={kr} warps={nw} {'one launch' if one else 'per round'} stages={st or 'default'}",
                  lambda kr=kr, nw=nw, one=one, st=st: mask(kr, nw, bool(one), st))
                 for kr, nw, one, st in itertools.product(*_lists(a.mask_grid)) if one or not st))
        for B in (1, B6) if a.decode_grid else ():
            wsd = window_starts(qbd[3][:B], w, cfg.block_size_k)
            idd = torch.full((B, HKV, n), -1, dtype=torch.int32, device=dev)
            dmk = dict(mk, block_size_q=1, query_stride=1)

            def run(B=B, wsd=wsd, idd=idd, dmk=dmk, **kw):
                hip_mask(qd[:B], kc, btd[:B], qbd[0][:B], qbd[1][:B], qbd[2][:B], wsd, out=idd, **dmk, **kw)

            run()
            ref_d = idd.clone()

            def decode(kr, nw, idd=idd, ref_d=ref_d, run=run):
                idd.fill_(-1)
                t = us_graph(lambda: run(krows=kr, num_warps=nw))
                return t, f"{t:.1f} us (same indices: {torch.equal(idd, ref_d)})"

            _report(f"  decode mask sweep B={B}, fastest first (default {dec[0 if B == 1 else 1]:.1f} us):", 6,
                    ((f"krows={kr} warps={nw}", lambda kr=kr, nw=nw: decode(kr, nw))
                     for kr, nw in itertools.product(*_lists(a.decode_grid))))
        del idx
    if a.log:
        with open(a.log, "w") as f:
            f.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
