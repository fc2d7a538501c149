"""Page swaps between the device and host tiers of offloaded KV caches (HiP KV offload).

``reference.swap_pages_reference`` is the readable torch version (a few ops per layer, and it copies every
candidate pair, active or not); ``PageSwapper`` is one Triton launch for all layers that moves only the active pairs. Each
layer's tier is addressed by its base address (int64), so tiers in different allocations, GPU memory and
pinned host memory mapped into the GPU's address space (UVA), are handled alike. Imports torch and triton only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import swap_pages_reference  # noqa: F401  (the oracle of PageSwapper; re-exported)


@triton.jit
def _swap_pages_kernel(dev_addr_ptr, host_addr_ptr, d_idx_ptr, h_idx_ptr, do_ptr, page_words,
                       BLOCK: tl.constexpr):
    i = tl.program_id(0)
    layer = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    # Inactive pairs get an empty range, so they touch no memory.
    limit = page_words * (tl.load(do_ptr + i) != 0).to(tl.int32)
    m = offs < limit
    d = tl.load(d_idx_ptr + i).to(tl.int64)
    h = tl.load(h_idx_ptr + i).to(tl.int64)
    dev = tl.load(dev_addr_ptr + layer).to(tl.pointer_type(tl.int32)) + d * page_words + offs
    host = tl.load(host_addr_ptr + layer).to(tl.pointer_type(tl.int32)) + h * page_words + offs
    a = tl.load(dev, mask=m)
    b = tl.load(host, mask=m)
    tl.store(dev, b, mask=m)
    tl.store(host, a, mask=m)


class PageSwapper:
    """``swap_pages_reference`` as one launch over fixed tiers (the address table is built once)."""

    def __init__(self, pairs, device):
        page_bytes = {p[0][0].numel() * p[0].element_size() for p in pairs} | {
            p[1][0].numel() * p[1].element_size() for p in pairs}
        if len(page_bytes) != 1 or next(iter(page_bytes)) % 4:
            raise ValueError(f"tiers must share one page size, a multiple of 4 bytes (got {sorted(page_bytes)})")
        for dev_t, host_t in pairs:
            if not (dev_t.is_contiguous() and host_t.is_contiguous()):
                raise ValueError("tiers must be contiguous page arrays")
        self.page_words = next(iter(page_bytes)) // 4
        self.dev_addr = torch.tensor([p[0].data_ptr() for p in pairs], dtype=torch.int64, device=device)
        self.host_addr = torch.tensor([p[1].data_ptr() for p in pairs], dtype=torch.int64, device=device)
        self.layers = len(pairs)
        self.block = min(4096, triton.next_power_of_2(self.page_words))

    def __call__(self, d_idx: torch.Tensor, h_idx: torch.Tensor, do: torch.Tensor) -> None:
        k = d_idx.shape[0]
        if k == 0 or self.layers == 0:
            return
        grid = (k, self.layers, triton.cdiv(self.page_words, self.block))
        _swap_pages_kernel[grid](self.dev_addr, self.host_addr, d_idx, h_idx, do.to(torch.int8), self.page_words,
                                 BLOCK=self.block)
