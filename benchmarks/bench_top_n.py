"""The mask's top-n tail alone: ``_top_n`` (the threshold found one bit per pass, 32 block-wide sums) against a
radix variant that settles ``BITS`` bits per pass (2^BITS thresholds counted in one 2-D sum, 32 / BITS passes).

Why: one program per (request, head) ranks every round's scores after the others have scored them, so this tail is
serial in each round of a decode refresh; the exact-only refresh ranks n x exact = 1,024 scores (k 1024, block 8),
a halving round 2n = 256. At 128K x 6 an exact-only refresh costs ~90 us per layer, which more scoring programs did
not reduce (BENCHMARKS.md §1, 2026-12-03 PDL entry), so the serial parts are the suspects.

Usage (GPU): ``python benchmarks/bench_top_n.py [--log F]``. Prints us per launch (CUDA graph, 48 programs = 6
requests x 8 KV heads) and checks that every variant keeps the same scores in the same slots.
"""
import argparse
import datetime
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.triton_hip import _top_n  # noqa: E402


@triton.jit
def _bench_kernel(sc_ptr, out_ptr, N: tl.constexpr, L: tl.constexpr, BITS: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.arange(0, L)
    sc = tl.load(sc_ptr + pid * L + i)
    ok = sc > float("-inf")
    sel, slot = _top_n(sc, ok, N, BITS)
    tl.store(out_ptr + pid * L + i, tl.where(sel, slot, -1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default=None)
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter)"
    lines = [f"# bench_top_n {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  GPU: {name}  "
             f"triton {triton.__version__}"]
    print(lines[0], flush=True)
    P = 48
    for N, L in ((128, 256), (128, 1024), (256, 2048)):
        torch.manual_seed(0)
        sc = torch.randn(P, L, device=dev)
        sc[:, ::7] = sc[:, 3:4]  # ties, which the rank order must break by index
        sc[:, -5:] = float("-inf")  # invalid candidates
        outs, times = {}, {}
        for bits in (1, 2, 4):
            for warps in (4, 8):
                o = torch.empty(P, L, dtype=torch.int32, device=dev)
                fn = lambda: _bench_kernel[(P,)](sc, o, N=N, L=L, BITS=bits, num_warps=warps)  # noqa: E731
                fn()
                outs[bits, warps] = o.clone()
                times[bits, warps] = (triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
                                      if dev == "cuda" else float("nan"))
        same = all(torch.equal(v, outs[1, 4]) for v in outs.values())
        line = (f"top {N} of {L}: " + ", ".join(f"bits {b} warps {w} {t:.2f} us" for (b, w), t in times.items())
                + f"; same selection in every variant: {same}")
        print(line, flush=True)
        lines.append(line)
    if a.log:
        with open(a.log, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
