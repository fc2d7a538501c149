"""Offload residency policy on a synthetic trace: how many of the pages HiP reads are on the GPU.

Drives the real ``vllm_hip.kv_residency.KVResidency`` (CPU tensors) the way the metadata builder does each
step: ``advance``, ``touch_slots`` for the pages the step writes, ``touch`` for every request's sink and window
pages and for the decode requests' cached selections, then ``rebalance``. It counts, for the pages the step then
reads, the share found on the GPU tier, separately for prefill and decode reads.

The trace stands in for what the H200 benchmark runs (6 requests of one long prompt, chunked prefill one
request after another while earlier requests decode, GPU pool capped at 20 % of their pages): each query block of
a prefill chunk and each decode request selects ``k`` tokens in pages drawn uniformly from its prefix (what a
model with dummy weights does; a trained model's selection is concentrated, so this is the hard case), plus
sink and window. Decode selections change every ``interval`` steps. Sizes are scaled down (pages, not tokens).

    python benchmarks/sim_offload_policy.py [--requests 6 --prompt-pages 1024 --cap 0.2 ...]
"""
import argparse

import torch

from vllm_hip.kv_residency import KVResidency


def run(a, write_moves: int) -> dict:
    g = torch.Generator().manual_seed(a.seed)
    R, P = a.requests, a.prompt_pages
    total = R * (P + a.decode_steps // a.page + 2)
    G = max(1, int(a.cap * total))
    res = KVResidency(total, G, "cpu", a.max_moves, max_write_moves=write_moves)
    # vLLM hands out free block ids in order: request r owns a contiguous range of logical pages
    base = [r * (P + a.decode_steps // a.page + 2) for r in range(R)]
    length = [0] * R  # pages written so far
    sel = [torch.empty(0, dtype=torch.long)] * R
    hits = {"prefill": [0, 0], "decode": [0, 0]}
    window, sink, kp = a.window_pages, a.sink_pages, a.k_pages
    step, r_pf = 0, 0
    decode_left = [a.decode_steps] * R
    while any(d > 0 for d in decode_left):
        res.advance()
        decoding = [r for r in range(R) if length[r] >= P and decode_left[r] > 0]
        writes, reads = [], {"prefill": [], "decode": []}
        if r_pf < R:  # one prefill chunk of request r_pf
            lo, hi = length[r_pf], min(P, length[r_pf] + a.chunk_pages)
            writes.append(torch.arange(base[r_pf] + lo, base[r_pf] + hi))
            for qb in range(a.query_blocks_per_chunk):
                end = lo + (hi - lo) * (qb + 1) // a.query_blocks_per_chunk
                prefix = torch.randint(0, max(1, end), (kp,), generator=g)
                near = torch.arange(max(0, end - window), end)
                reads["prefill"].append(base[r_pf] + torch.cat([prefix, near, torch.arange(min(sink, end))]))
            length[r_pf] = hi
            if hi == P:
                r_pf += 1
        for r in decoding:
            n = length[r]
            if (a.decode_steps - decode_left[r]) % a.interval == 0:
                sel[r] = base[r] + torch.randint(0, n, (kp,), generator=g)
            writes.append(torch.tensor([base[r] + n]))  # the page of the new token (coarsely, one per step)
            reads["decode"].append(torch.cat([sel[r], base[r] + torch.arange(max(0, n - window), n),
                                              base[r] + torch.arange(sink)]))
        w = torch.cat(writes) if writes else torch.empty(0, dtype=torch.long)
        res.touch_slots(w * a.page, a.page)
        for r in range(R):  # sink and window of every request with pages
            n = length[r]
            if n:
                res.touch(base[r] + torch.cat([torch.arange(min(sink, n)), torch.arange(max(0, n - window), n)]))
        for r in decoding:
            res.touch(sel[r])
        res.rebalance([(torch.zeros(G), torch.zeros(total - G))])
        on_gpu = res.loc < G
        for kind, lst in reads.items():
            if lst:
                pages = torch.cat(lst)
                hits[kind][0] += int(on_gpu[pages].sum())
                hits[kind][1] += pages.numel()
        for r in decoding:
            decode_left[r] -= 1
            if (a.decode_steps - decode_left[r]) % a.page == 0:
                length[r] += 1
        step += 1
    moved = res.read_stats()["pages_moved"]
    return {"write_moves": write_moves, "gpu_pages": G, "pages": total, "steps": step,
            "prefill_hit": hits["prefill"][0] / max(1, hits["prefill"][1]),
            "decode_hit": hits["decode"][0] / max(1, hits["decode"][1]), "pages_moved_per_step": moved / step}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--prompt-pages", type=int, default=1024, help="pages per prompt (128K tokens = 8192)")
    ap.add_argument("--cap", type=float, default=0.2, help="GPU pages as a share of all the requests' pages")
    ap.add_argument("--chunk-pages", type=int, default=128, help="pages per prefill chunk (16K tokens = 1024)")
    ap.add_argument("--query-blocks-per-chunk", type=int, default=16)
    ap.add_argument("--k-pages", type=int, default=128, help="pages a query block selects (k=2048 tokens, bk 16)")
    ap.add_argument("--window-pages", type=int, default=64)
    ap.add_argument("--sink-pages", type=int, default=8)
    ap.add_argument("--decode-steps", type=int, default=256)
    ap.add_argument("--interval", type=int, default=8)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--max-moves", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(f"{a.requests} requests x {a.prompt_pages} pages, GPU pool {a.cap:.0%}, chunk {a.chunk_pages} pages, "
          f"max_moves {a.max_moves}, uniform selection of {a.k_pages} pages per query block")
    print("policy                         prefill hit  decode hit  pages moved/step")
    for wm in (0, a.chunk_pages + a.requests):
        r = run(a, wm)
        name = "LRU (max_moves only)" if wm == 0 else f"LRU + written pages first ({wm})"
        print(f"{name:30s} {r['prefill_hit']:11.3f} {r['decode_hit']:11.3f} {r['pages_moved_per_step']:17.1f}")


if __name__ == "__main__":
    main()
