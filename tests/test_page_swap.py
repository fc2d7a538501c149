"""kernels/page_swap.py: the one-launch page swap equals the torch reference (CUDA; CPU under the interpreter)."""
import pytest
import torch

from vllm_hip.kernels.page_swap import PageSwapper, swap_pages_reference


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,H,k", [(6, 10, 4), (3, 20, 3), (8, 8, 1)])
def test_swapper_equals_reference(dtype, G, H, k):
    dev = _device()
    g = torch.Generator().manual_seed(G * 100 + H)
    layers = 3
    page = (4, 2, 8)  # [page_size, heads, 2*head_size] of one page
    dev_t = [torch.randn((G, *page), generator=g).to(dtype).to(dev) for _ in range(layers)]
    host_t = [torch.randn((H, *page), generator=g).to(dtype).to(dev) for _ in range(layers)]
    d_idx = torch.randperm(G, generator=g)[:k].to(dev)
    h_idx = torch.randperm(H, generator=g)[:k].to(dev)
    do = (torch.rand(k, generator=g) > 0.4).to(dev)
    want_d = [t.clone() for t in dev_t]
    want_h = [t.clone() for t in host_t]
    swap_pages_reference(list(zip(want_d, want_h)), d_idx, h_idx, do)
    PageSwapper([(a.view(G, -1), b.view(H, -1)) for a, b in zip(dev_t, host_t)], dev)(d_idx, h_idx, do)
    for got, want in zip(dev_t + host_t, want_d + want_h):
        assert torch.equal(got, want)
    # Inactive pairs really stay: the reference is not a no-op by accident.
    if not do.all():
        i = int(torch.nonzero(~do)[0])
        assert torch.equal(dev_t[0][d_idx[i]], want_d[0][d_idx[i]])
