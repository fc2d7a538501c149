"""Registers and spills of the HiP mask kernels compiled for the H100/H200 (sm_90a), on a machine without a GPU.

    python benchmarks/sm90_resources.py [--exact 1,8,16]

Triton compiles to PTX for a target named by hand, and the ptxas shipped with Triton's NVIDIA backend reports
each kernel's registers, stack and spill bytes (``-v``). That catches a kernel change that would spill or fail to
compile on the GPU before device time is spent on it. It does not time anything. The Triton here (the CPU
machine's) can differ from the GPU machine's, so the counts are indications. Shapes: a Llama-3.1-8B layer (4 query
heads per KV head, head 128, bf16) with the GPU benchmarks' k = 2048 at bk = 8 (n = 256). Decode: one query row,
64-key chunks. Prefill: 32 strided rows of a 64-query block, 32-key chunks, as ``hip_mask`` picks them.
"""
from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from vllm_hip.kernels import triton_hip as th  # noqa: E402

POINTERS = {n: "*i32" for n in ("bt_ptr", "qb_req_ptr", "qb_start_ptr", "qb_len_ptr", "ws_ptr", "out_ptr", "out_row_ptr",
                                "lo_ptr", "hi_ptr", "lo_in", "hi_in", "lo_out", "hi_out", "cnt_ptr", "glo_ptr",
                                "ghi_ptr")}
POINTERS.update(q_ptr="*bf16", k_ptr="*bf16", score_ptr="*fp32", norm_ptr="*fp32", active_ptr="*i1", coarse_ptr="*i1",
                hk_off="i64")


def ptxas_report(jitfn, consts: dict, num_warps: int) -> str:
    names = list(inspect.signature(jitfn.fn).parameters)
    sig, cst = {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n], cst[(i,)] = "constexpr", consts[n]
        else:
            sig[n] = POINTERS.get(n, "i32")
    k = triton.compile(ASTSource(fn=jitfn, signature=sig, constexprs=cst), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps})
    bindir = Path(triton.backends.nvidia.__file__).parent / "bin"
    # the newest ptxas Triton ships (its PTX version may be past the older one's)
    ptxas = next(p for p in (bindir / "ptxas-blackwell", bindir / "ptxas") if p.exists())
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(k.asm["ptx"])
        r = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    out = r.stdout + r.stderr
    if r.returncode:
        return "ptxas failed: " + out[-300:]
    keep = [ln.split("info    :")[-1].strip() if "info" in ln else ln.strip() for ln in out.splitlines()
            if "registers" in ln or "spill" in ln]
    return "; ".join(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exact", default="1,8,16", help="values of hip.mask_exact_blocks")
    ap.add_argument("--groups", action="store_true", help="the per-round kernels with the staged refresh's groups")
    a = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90a")
    n = 256
    shapes = {"decode": dict(NQ=1, NQ_P=1, M_PAD=16, KROWS=64), "prefill": dict(NQ=32, NQ_P=32, M_PAD=128, KROWS=32)}
    for e in (int(x) for x in a.exact.split(",")):
        for phase, shp in shapes.items():
            consts = dict(G=4, D=128, N=n, N_PAD=n, BK=8, STRIDE=2, HAS_ACTIVE=True, IEEE=False, UPCAST=False,
                          EXACT=e, E_PAD=e, SC_W=max(2, e) * n, NORM=True, NS=8, **shp)
            warps = 4 if shp["M_PAD"] * shp["KROWS"] <= 64 * 64 else 8
            kerns = (th._hip_mask_round_kernel, th._hip_mask_kernel, th._hip_mask_round_kernel_tiered,
                     th._hip_mask_kernel_tiered)
            if a.groups:
                if phase != "decode" or e == 1:
                    continue
                kerns = kerns[::2]
            for kern in kerns:
                if "round" in kern.fn.__name__:
                    consts["GROUPS"] = a.groups
                else:
                    consts.pop("GROUPS", None)
                print(f"exact_blocks {e:>2}  {phase:<7}  {kern.fn.__name__:<31} {warps} warps: "
                      f"{ptxas_report(kern, consts, warps)}", flush=True)


if __name__ == "__main__":
    main()
