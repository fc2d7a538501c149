"""The start-up check that decides whether dense prefill and dense-layer decode go to vLLM's FlashAttention.

On a GPU it runs vLLM's real FlashAttention (covered by tests/test_gpu_vllm.py). Here it runs on the CPU with
our Triton dense kernel under the interpreter against stand-ins for FlashAttention: a correct one must pass, and
stand-ins that get the paged layout or the per-request lengths wrong must be refused, with the reason.
"""
import os
import sys

import pytest
import torch

if torch.cuda.is_available():  # there the real FlashAttention runs this check (tests/test_gpu_vllm.py)
    pytest.skip("CPU stand-in test", allow_module_level=True)
else:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
pytest.importorskip("vllm")

from vllm_hip import compat, ops  # noqa: E402


def reference_fa(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal,
                 block_table, fa_version, *, use_max_len=False, ignore_table=False):
    """FlashAttention's varlen paged contract in plain torch (causal aligned to the end of each request)."""
    assert causal
    hkv, d = k.shape[2], k.shape[3]
    for r in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[r]), int(cu_seqlens_q[r + 1])
        n = q1 - q0
        L = min(int(max_seqlen_k), block_table.shape[1] * k.shape[1]) if use_max_len else int(seqused_k[r])
        pages = torch.arange(block_table.shape[1]) if ignore_table else block_table[r].long()
        keys = k[pages].reshape(-1, hkv, d)[:L].float()
        vals = v[pages].reshape(-1, hkv, d)[:L].float()
        g = q.shape[1] // hkv
        keys, vals = keys.repeat_interleave(g, 1), vals.repeat_interleave(g, 1)
        s = torch.einsum("nhd,lhd->hnl", q[q0:q1].float(), keys) * softmax_scale
        pos = torch.arange(n)[:, None] + (L - n)
        s = s.masked_fill(torch.arange(L)[None, :] > pos, float("-inf"))
        out[q0:q1] = torch.einsum("hnl,lhd->nhd", s.softmax(-1), vals).to(out.dtype)


def _check(monkeypatch, fa):
    monkeypatch.setattr(compat, "flash_attn_varlen", lambda: (fa, 3))
    return ops.flash_attn_check(torch.device("cpu"), torch.float32, head_size=32, num_kv_heads=2, page_size=16)


def test_correct_flash_attention_passes(monkeypatch):
    assert _check(monkeypatch, reference_fa) is None


@pytest.mark.parametrize("wrong", ["use_max_len", "ignore_table"])
def test_wrong_flash_attention_is_refused(monkeypatch, wrong):
    why = _check(monkeypatch, lambda *a, **kw: reference_fa(*a, **kw, **{wrong: True}))
    assert why is not None and "disagrees" in why


def test_rejecting_flash_attention_is_refused(monkeypatch):
    def rejects(*a, **kw):
        raise RuntimeError("unsupported stride")

    why = _check(monkeypatch, rejects)
    assert why is not None and "rejected" in why and "unsupported stride" in why
