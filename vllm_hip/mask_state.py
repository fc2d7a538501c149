"""Per-request decode mask state: which cached HiP mask a decoding request may reuse this step.

Decode re-estimates a request's mask only every ``mask_refresh_interval`` steps and reuses it in between.
The cached masks live in per-layer device buffers with one row per *slot*; this module decides, once per
step and for all layers, each decode request's slot and whether it refreshes. All of it is device tensor
arithmetic (no host sync), so it also works when the forward is replayed from a CUDA graph.

Identity without request ids (the V1 runner does not give the backend any): a request is keyed by its
first KV block (``block_table[r, 0]``), which no other live request owns unless they share a cached prefix.
A slot's mask is reused only if

* the slot's owner is this first block, and
* the *anchor* matches: the KV block that held the last token at refresh time. That block was being
  written at refresh time, so it belonged to this request alone; a different request on the same slot
  cannot have the same block at that position unless it shares that exact prefix, in which case the
  mask is the same computation anyway; and
* the request has advanced by 1 .. interval-1 tokens since the refresh.

Every prefill step invalidates its request's slot (so a recycled first block never inherits a mask).
Requests of one batch that hash to the same slot use private scratch rows and refresh every step: still
correct, only slower. Requests at or below ``dense_below_seq_len`` tokens attend densely and skip the mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DecodeMaskPlan:
    """Per decode request: the mask row to read/write, whether to refresh it, and its window start."""

    row: torch.Tensor  # int32 [Rd]: row of the per-layer mask cache
    refresh: torch.Tensor  # bool [Rd]: estimate the mask this step
    window_start: torch.Tensor  # int32 [Rd]: window start used by attention (0 = dense)


class DecodeMaskState:
    """Device-side slot table shared by all HiP layers of one KV-cache group."""

    def __init__(self, num_slots: int, max_decodes: int, device, *, page_size: int, window: int,
                 block_size_k: int, interval: int, dense_below: int):
        self.num_slots = num_slots
        self.max_decodes = max_decodes
        self.page_size = page_size
        self.window = window
        self.block_size_k = block_size_k
        self.interval = interval
        self.dense_below = dense_below
        # One extra entry at the end absorbs writes we do not want to keep (branch-free scatter).
        n = num_slots + 1
        self.owner = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.anchor = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.refresh_len = torch.zeros(n, dtype=torch.int64, device=device)
        self.window_start = torch.zeros(n, dtype=torch.int64, device=device)

    @property
    def cache_rows(self) -> int:
        """Rows each layer's mask cache needs: the slots plus one scratch row per decode request."""
        return self.num_slots + self.max_decodes

    def invalidate(self, block_table: torch.Tensor, reqs: torch.Tensor) -> None:
        """Forget the masks of requests ``reqs`` (prefill steps): their next decode step refreshes."""
        if reqs.numel() == 0:
            return
        slot = block_table[reqs.long(), 0].long() % self.num_slots
        self.owner[slot] = -1

    def plan(self, block_table: torch.Tensor, seq_lens: torch.Tensor, reqs: torch.Tensor) -> DecodeMaskPlan:
        """Decide rows and refreshes for decode requests ``reqs`` (indices into the batch) and update state."""
        dev = self.owner.device
        r = reqs.long()
        Rd = r.shape[0]
        L = seq_lens[r].long()
        bt = block_table.long()
        first = bt[r, 0]
        slot = first % self.num_slots
        count = torch.zeros(self.num_slots, dtype=torch.int64, device=dev).index_add_(
            0, slot, torch.ones_like(slot)
        )
        private = count[slot] > 1
        scratch = self.num_slots + torch.arange(Rd, device=dev)

        ref_len = self.refresh_len[slot]
        anchor_page = torch.clamp(ref_len - 1, min=0) // self.page_size
        anchor_page = torch.clamp(anchor_page, max=bt.shape[1] - 1)
        anchor_now = bt[r, anchor_page]
        age = L - ref_len
        valid = (
            (self.owner[slot] == first)
            & (self.anchor[slot] == anchor_now)
            & (age > 0)
            & (age < self.interval)
            & ~private
        )
        dense = L <= self.dense_below
        live = L > 0  # padding rows of a fixed-size (CUDA graph) decode batch have no tokens
        refresh = ~valid & ~dense & live

        bk = self.block_size_k
        new_ws = torch.clamp(torch.div(L - 1 - self.window, bk, rounding_mode="floor") * bk, min=0)
        ws = torch.where(refresh, new_ws, self.window_start[slot])
        ws = torch.where(dense, torch.zeros_like(ws), ws)

        # Record refreshes of shared slots; private/dense rows write into the trash entry.
        keep = refresh & ~private
        w = torch.where(keep, slot, torch.full_like(slot, self.num_slots))
        self.owner[w] = first
        self.anchor[w] = bt[r, torch.clamp((L - 1) // self.page_size, max=bt.shape[1] - 1)]
        self.refresh_len[w] = L
        self.window_start[w] = new_ws

        row = torch.where(private, scratch, slot)
        return DecodeMaskPlan(row=row.to(torch.int32), refresh=refresh, window_start=ws.to(torch.int32))
