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

from flash_attn_ref import reference_fa  # noqa: E402

from vllm_hip import compat, ops  # noqa: E402


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
