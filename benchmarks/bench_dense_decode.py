"""Dense decode attention of one Llama-3.1-8B layer at long contexts: FlashAttention-3's split-K choices against our
Triton kernel in dense mode, in vLLM's KV layout (K and V of a token interleaved, 16-token pages) and CUDA graphs.

Why: HIP keeps the first layers dense, and at 128K x 6 those 3 layers are a third of a decode step. The kernel bench
(BENCHMARKS.md §1) measured FA3 at 128K at 3.9 TB/s for batch 1 and 4.4 TB/s for batch 16 but 3.1 TB/s for batch 6,
which points at FA3's split count, not its kernel. This sweeps what the backend can choose for those calls:
FA3's ``num_splits`` and ``max_seqlen_k`` (a static upper bound inside a graph), the scheduler metadata vLLM's own
FLASH_ATTN backend passes, and our ``hip_attention`` with every window at 0. It also times a hand-over call with no
rows (the FlashAttention call each HiP layer of a decode graph makes for its short rows).

Usage (GPU, vLLM on PYTHONPATH): ``python benchmarks/bench_dense_decode.py [--lengths 131072] [--batches 6]``.
Prints one line per variant: median us (``triton.testing.do_bench_cudagraph``), GB/s of K+V read, and the largest
difference from the first variant's output.
"""
import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.triton_hip import hip_attention  # noqa: E402
from kernels.reference import make_query_blocks  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
DT = torch.bfloat16


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--batches", default="1,6,16", help="requests; each is also run padded to the next captured "
                                                        "graph size (8, 16, 24: padding rows read no keys)")
    ap.add_argument("--splits", default="0,1,2,3,4,6,8,11,16,32")
    ap.add_argument("--ours", action="store_true", help="also sweep our kernel's launch knobs (slower)")
    a = ap.parse_args()
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"# {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}")
    lengths = [int(x) for x in a.lengths.split(",")]
    batches = [int(x) for x in a.batches.split(",")]
    max_model_len = 131344
    g = torch.Generator(device="cpu").manual_seed(0)
    need = max(lengths) * max(max(batches), 8) // PAGE + 8
    kv = torch.randn(need, PAGE, HKV, 2 * D, generator=g).to(dev, DT)  # physical [blocks, page, heads, 2*hs]
    k_cache, v_cache = kv[..., :D], kv[..., D:]  # what compat.split_kv_cache hands FlashAttention
    scale = D ** -0.5
    for T in lengths:
        for B in batches:
            padded = next(s for s in (1, 2, 4, 8, 16, 24, 32) if s >= B)
            for rows in sorted({B, padded}):
                nb = T // PAGE
                bt = torch.zeros(rows, -(-max_model_len // PAGE), dtype=torch.int32)
                perm = torch.randperm(need - 1, generator=g)
                for r in range(B):
                    bt[r, :nb] = perm[(r * nb) % (need - nb): (r * nb) % (need - nb) + nb]
                bt = bt.to(dev)
                seq = torch.tensor([T] * B + [0] * (rows - B), dtype=torch.int32, device=dev)
                q = torch.randn(rows, HQ, D, generator=g).to(dev, DT)
                cu = torch.arange(rows + 1, dtype=torch.int32, device=dev)
                out = torch.empty_like(q)
                gb = B * T * HKV * 2 * D * 2 / 1e9
                tag = f"T={T} B={B} rows={rows}"
                ref = None
                results = []

                def record(name, fn):
                    nonlocal ref
                    t = bench(fn)
                    fn()
                    torch.cuda.synchronize()
                    o = out[:B].float().clone()
                    if ref is None:
                        ref = o
                    err = (o - ref).abs().max().item()
                    results.append((t, name))
                    print(f"{tag}: {name:<44} {t:9.1f} us {gb / t * 1e6:7.0f} GB/s  max|diff| {err:.2e}", flush=True)

                for maxk in (T, 16384, max_model_len):
                    for s in [int(x) for x in a.splits.split(",")]:
                        record(f"FA3 max_seqlen_k={maxk} num_splits={s}", lambda: flash_attn_varlen_func(
                            q, k_cache, v_cache, 1, cu, maxk, seqused_k=seq, causal=True, block_table=bt, out=out,
                            softmax_scale=scale, num_splits=s, fa_version=3))
                # vLLM's FLASH_ATTN backend in a full decode graph: scheduler metadata for this step, <= 32 splits
                md = get_scheduler_metadata(batch_size=rows, max_seqlen_q=1, max_seqlen_k=T, num_heads_q=HQ,
                                            num_heads_kv=HKV, headdim=D, cache_seqlens=seq, qkv_dtype=DT,
                                            cu_seqlens_q=cu, page_size=PAGE, causal=True, num_splits=32)
                record("FA3 as vLLM's FLASH_ATTN (scheduler metadata, 32)", lambda: flash_attn_varlen_func(
                    q, k_cache, v_cache, 1, cu, T, seqused_k=seq, causal=True, block_table=bt, out=out,
                    softmax_scale=scale, scheduler_metadata=md, num_splits=32, fa_version=3))
                qb = [t.clone() for t in make_query_blocks(cu, seq, 1)]
                qb[2][B:] = 0  # padding rows of a captured batch: no query, as the decode plan writes them
                zeros = torch.zeros_like(qb[0])
                nidx = torch.full((rows, HKV, 1), -1, dtype=torch.int32, device=dev)
                own = dict(sink_tokens=0, block_size_k=1, scale=scale, out=out)
                record("ours dense (defaults)", lambda: hip_attention(q, k_cache, v_cache, bt, seq, *qb, zeros, nidx,
                                                                       **own))
                if a.ours and T == max(lengths) and B == 6:
                    # 2 warps, 64-key tiles, 2 stages: the fastest of 84 variants at 128K x 6 (2026-12-02 20:05)
                    for s in (11, 22, 44, 64):
                        record(f"ours S={s} warps=2 block_n=64 stages=2",
                               lambda: hip_attention(q, k_cache, v_cache, bt, seq, *qb, zeros, nidx, num_splits=s,
                                                     num_warps=2, block_n=64, num_stages=2, **own))
                best = sorted(results)[:5]
                print(f"{tag}: fastest: " + "; ".join(f"{n} {t:.1f}" for t, n in best), flush=True)
            # The hand-over call of a HiP layer when no row is short: every seqused_k 0
            empty = torch.zeros(padded, dtype=torch.int32, device=dev)
            qe = torch.randn(padded, HQ, D, generator=g).to(dev, DT)
            cue = torch.arange(padded + 1, dtype=torch.int32, device=dev)
            bte = torch.zeros(padded, 1024, dtype=torch.int32, device=dev)
            oute = torch.empty_like(qe)
            for s in (0, 1):
                t = bench(lambda: flash_attn_varlen_func(qe, k_cache, v_cache, 1, cue, 16384, seqused_k=empty,
                                                         causal=True, block_table=bte, out=oute, softmax_scale=scale,
                                                         num_splits=s, fa_version=3))
                print(f"T={T} B={B} rows={padded}: FA3 hand-over with no rows, max_seqlen_k=16384 num_splits={s} "
                      f"{t:9.1f} us", flush=True)


if __name__ == "__main__":
    main()
