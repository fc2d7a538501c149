"""Attention statistics: what fraction of the causal keys HiP actually attended, per layer and phase.

Off unless ``hip.record_stats`` is true. Counters accumulate on the device (no host sync in ``forward``);
``attended_fraction()`` reads them (one sync). They live in the worker process: with vLLM's default
multiprocessing that is not the caller's process, so read them in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) or from a worker extension.
"""
from __future__ import annotations

import torch

# (layer index, phase) -> float64 tensor [attended, causal]
_COUNTS: dict[tuple[int, str], torch.Tensor] = {}


def reset() -> None:
    _COUNTS.clear()


def record(layer: int, phase: str, qb_len: torch.Tensor, qb_pos0: torch.Tensor, window_start: torch.Tensor,
           selected_blocks: torch.Tensor | None, sink_tokens: int, block_size_k: int) -> None:
    """Add one launch's counts. ``selected_blocks``: ``[QB, Hkv]`` valid selections, None for dense."""
    n = qb_len.double()
    causal = n * qb_pos0.double() + n * (n + 1) / 2  # sum over the block's queries of (position + 1)
    if selected_blocks is None:
        attended = causal
    else:
        ws = window_start.double()
        sel = selected_blocks.double().mean(dim=1) * block_size_k
        attended = n * (torch.clamp(ws, max=float(sink_tokens)) + sel - ws) + causal
    acc = _COUNTS.get((layer, phase))
    if acc is None:
        acc = _COUNTS[(layer, phase)] = torch.zeros(2, dtype=torch.float64, device=qb_len.device)
    acc += torch.stack([attended.sum(), causal.sum()])


def attended_fraction() -> dict:
    """``{"overall", "prefill", "decode"}`` fractions over all layers, and ``"per_layer"`` ones."""
    per_layer: dict[int, list[float]] = {}
    phase_tot = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}
    for (layer, phase), acc in _COUNTS.items():
        a, c = acc.tolist()
        per_layer.setdefault(layer, [0.0, 0.0])
        per_layer[layer][0] += a
        per_layer[layer][1] += c
        phase_tot[phase][0] += a
        phase_tot[phase][1] += c
    frac = lambda ac: ac[0] / ac[1] if ac[1] else None  # noqa: E731
    total = [sum(v[0] for v in phase_tot.values()), sum(v[1] for v in phase_tot.values())]
    return {
        "overall": frac(total),
        "prefill": frac(phase_tot["prefill"]),
        "decode": frac(phase_tot["decode"]),
        "per_layer": {k: frac(v) for k, v in sorted(per_layer.items())},
    }
