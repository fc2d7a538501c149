"""The start-up warm-up (ops.compile_kernels) launches every Triton kernel variant a HiP layer uses, so that no
serving step compiles one (vLLM's jit_monitor caught _hip_mask_kernel / _hip_attn_kernel compiling mid-run on the
H200). Runs the warm-up for real (Triton interpreter on CPU) and records which kernels and constexpr variants it
launched."""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
pytest.importorskip("vllm")

from vllm_hip import ops  # noqa: E402
from vllm_hip.config import HipConfig  # noqa: E402


class Spy:
    def __init__(self, kernel, seen, name):
        self.kernel, self.seen, self.name = kernel, seen, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.seen.add((self.name, tuple(sorted((k, v) for k, v in kw.items() if k in ("SPLIT", "QR", "HAS_ACTIVE")))))
            return launch(*args, **kw)
        return run


def test_warm_up_launches_every_variant(monkeypatch):
    th = ops._triton()
    seen = set()
    for name in ("_hip_mask_kernel", "_hip_mask_init_kernel", "_hip_mask_round_kernel", "_hip_attn_kernel",
                 "_merge_kernel", "_kv_write_kernel"):
        monkeypatch.setattr(th, name, Spy(getattr(th, name), seen, name))
    cfg = HipConfig.from_dict({"k": 64, "block_size_k": 4, "block_size_q": 16, "sink_tokens": 8, "sliding_window": 32})
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops.compile_kernels(dev, torch.float32, num_heads=8, num_kv_heads=2, head_size=32, page_size=16,
                        block_table_width=40, cfg=cfg)
    names = {n for n, _ in seen}
    assert names == {"_hip_mask_kernel", "_hip_mask_init_kernel", "_hip_mask_round_kernel", "_hip_attn_kernel",
                     "_merge_kernel", "_kv_write_kernel"}, names
    attn = {dict(v)["QR"] > 1: set() for n, v in seen if n == "_hip_attn_kernel"}
    for n, v in seen:
        if n == "_hip_attn_kernel":
            attn[dict(v)["QR"] > 1].add(dict(v)["SPLIT"])
    assert attn == {True: {True, False}, False: {True, False}}, attn  # prefill and decode tiles, split or not
    for kernel in ("_hip_mask_kernel", "_hip_mask_round_kernel"):  # prefill (no refresh flags) and decode
        assert {dict(v)["HAS_ACTIVE"] for n, v in seen if n == kernel} == {True, False}, kernel


def test_warm_up_with_offload_launches_the_two_tier_variants(monkeypatch):
    """With KV offload the HiP layers launch the ``*_tiered`` kernels and the page swap; on the H200 they compiled
    at first use, inside serving steps (jit_monitor). The warm-up must launch them too, with a host tier."""
    import vllm_hip.kernels.page_swap as ps

    th = ops._triton()
    seen = set()
    tiered = ("_hip_mask_kernel_tiered", "_hip_mask_round_kernel_tiered", "_hip_attn_kernel_tiered",
              "_kv_write_kernel_tiered")
    for name in tiered:
        monkeypatch.setattr(th, name, Spy(getattr(th, name), seen, name))
    monkeypatch.setattr(ps, "_swap_pages_kernel", Spy(ps._swap_pages_kernel, seen, "_swap_pages_kernel"))
    cfg = HipConfig.from_dict({"k": 64, "block_size_k": 4, "block_size_q": 16, "sink_tokens": 8, "sliding_window": 32,
                               "offload": {"gpu_blocks": 8, "host_gib": 0.01}})
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops.compile_kernels(dev, torch.float32, num_heads=8, num_kv_heads=2, head_size=32, page_size=16,
                        block_table_width=40, cfg=cfg, host_tier=True)
    assert {n for n, _ in seen} == {*tiered, "_swap_pages_kernel"}, seen
    assert {dict(v)["SPLIT"] for n, v in seen if n == "_hip_attn_kernel_tiered"} == {True, False}
