"""Host time of our Python launch wrappers for one HiP decode layer (mask refresh + sparse attention), with the
Triton kernels replaced by no-op stubs, so any machine (CPU included) measures the wrapper code alone; Triton's own
launcher cost comes on top on a GPU. Shapes: Llama-3.1-8B layer (32 q / 8 kv heads, head 128), 6 decode requests
at 128K, k=2048 (n=256 blocks of 8).

    PYTHONPATH=. python benchmarks/bench_wrapper_overhead.py
"""
import time

import torch

import kernels.triton_hip as th

STUBBED = ["_hip_mask_init_kernel", "_hip_mask_round_kernel", "_hip_mask_round_kernel_tiered", "_hip_attn_kernel",
           "_hip_attn_kernel_tiered", "_merge_kernel", "_hip_mask_kernel", "_hip_mask_kernel_tiered"]


class _Stub:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    for name in STUBBED:
        setattr(th, name, _Stub())
    QB, Hkv, G, D = 6, 8, 4, 128
    i32 = lambda x: torch.as_tensor(x, dtype=torch.int32)  # noqa: E731
    q = torch.randn(QB, Hkv * G, D)
    kc = torch.randn(64, 16, Hkv, D)
    bt = torch.randint(0, 64, (QB, 8208), dtype=torch.int32)
    req, start, ln = i32(range(QB)), i32(range(QB)), i32([1] * QB)
    seq = i32([131072] * QB)
    ws = seq - 1024
    cache = torch.full((16, Hkv, 256), -1, dtype=torch.int32)
    row, active, o = i32(range(QB)), torch.ones(QB, dtype=torch.bool), torch.empty(QB, Hkv * G, D)

    def layer():
        th.hip_mask(q, kc, bt, req, start, ln, ws, n_select=256, block_size_q=1, block_size_k=8, sink_tokens=128,
                    out=cache, out_row=row, active=active, single_launch=False)
        th.hip_attention(q, kc, kc, bt, seq, req, start, ln, seq - 1, ws, cache, sink_tokens=128, block_size_k=8,
                         scale=0.1, out=o, indices_row=row)

    for _ in range(200):
        layer()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(2000):
            layer()
        best = min(best, (time.perf_counter() - t) / 2000)
    print(f"wrapper host time per HiP decode layer (kernels stubbed, best of 5 x 2000): {best * 1e6:.1f} us")


if __name__ == "__main__":
    main()
