"""Per-request decode mask state: which cached HiP mask a decoding request may reuse this step.

Decode re-estimates a request's mask only every ``mask_refresh_interval`` steps and reuses it in between.
The cached masks live in per-layer device buffers with one row per *slot*; this module decides, once per
step and for all layers, each decode request's slot and whether it refreshes. All of it is device tensor
arithmetic (no host sync), so it also works when the forward is replayed from a CUDA graph.

Identity without request ids (the V1 runner gives the backend none): a decoding request is keyed by the KV
block that holds its newest token. That block is being written this step, so it belongs to this request
alone (prefix caching shares only full blocks); two live requests never have the same key, whatever prefix
they share (``n > 1``, a common system prompt). When the newest token starts a new block, the request is
found through its previous block (also private: it was the request's own last block) and its slot follows it.

* ``slot_of_block[block]``: the slot last given to the request whose newest token was in ``block``;
* ``slot_key[slot]``: the block that currently owns the slot (a lookup is valid only if it matches);
* a request refreshes when it has no valid slot, or ``mask_refresh_interval`` tokens passed since its
  last refresh; new slots are taken from the slots no request of this step keeps (a prefix-sum allocation).

Refreshes therefore happen at positions that depend only on the request itself, never on which other
requests share the batch. Prefill steps (and any step of a request still in its prompt) drop the slot of
the block they end in, so a recycled block never hands over another request's mask. Requests at or below
``dense_below_seq_len`` tokens attend densely and skip the mask.
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

    def __init__(self, num_slots: int, num_blocks: int, device, *, page_size: int, window: int,
                 block_size_k: int, interval: int, dense_below: int):
        self.num_slots = num_slots
        self.page_size = page_size
        self.window = window
        self.block_size_k = block_size_k
        self.interval = interval
        self.dense_below = dense_below
        n = num_slots + 1  # the last entry absorbs writes we do not want to keep (branch-free scatter)
        self.trash = num_slots
        self.slot_key = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.refresh_len = torch.zeros(n, dtype=torch.int64, device=device)
        self.window_start = torch.zeros(n, dtype=torch.int64, device=device)
        # Indexed by block id modulo its size (identity when num_blocks covers every id); the last entry
        # absorbs writes we do not keep. A wrong entry is harmless: a lookup must also match slot_key.
        self.num_blocks = num_blocks
        self.slot_of_block = torch.full((num_blocks + 1,), self.trash, dtype=torch.int64, device=device)
        self.block_trash = num_blocks

    @property
    def cache_rows(self) -> int:
        """Rows each layer's mask cache needs (the slots plus the trash row)."""
        return self.num_slots + 1

    def _block_at(self, block_table, r, pos):
        page = torch.clamp(torch.div(pos, self.page_size, rounding_mode="floor"), 0, block_table.shape[1] - 1)
        return block_table.long()[r, page]

    def _entry(self, block):
        return block % self.num_blocks

    def invalidate(self, block_table: torch.Tensor, seq_lens: torch.Tensor, reqs: torch.Tensor) -> None:
        """Prefill steps of ``reqs``: forget any slot keyed by the block their newest token is in."""
        if reqs.numel() == 0:
            return
        r = reqs.long()
        key = self._block_at(block_table, r, seq_lens.long()[r] - 1)
        s = self.slot_of_block[self._entry(key)]
        mine = self.slot_key[s] == key
        self.slot_key[torch.where(mine, s, torch.full_like(s, self.trash))] = -1

    def plan(self, block_table: torch.Tensor, seq_lens: torch.Tensor, reqs: torch.Tensor,
             prompt_step: torch.Tensor | None = None) -> DecodeMaskPlan:
        """Decide rows and refreshes for decode requests ``reqs`` (indices into the batch) and update state.

        ``prompt_step`` (bool per request of ``reqs``): one-token steps that are still in the prompt (e.g. the
        last prompt token after a full prefix-cache hit); they never reuse a mask.
        """
        dev = self.slot_key.device
        r = reqs.long()
        L = seq_lens.long()[r]
        live = L > 0  # padding rows of a fixed-size (CUDA graph) decode batch have no tokens
        key_now = self._block_at(block_table, r, L - 1)
        new_page = (L - 1) % self.page_size == 0
        key_prev = torch.where(new_page & (L > 1), self._block_at(block_table, r, L - 2), key_now)
        s_prev = self.slot_of_block[self._entry(key_prev)]
        own = (self.slot_key[s_prev] == key_prev) & live
        if prompt_step is not None:
            own &= ~prompt_step
        age = L - self.refresh_len[s_prev]
        dense = L <= self.dense_below
        refresh = ~(own & (age > 0) & (age < self.interval)) & ~dense & live

        # Slots kept this step: those of requests that own one. The others get free slots in batch order.
        trash = torch.full_like(s_prev, self.trash)
        used = torch.zeros(self.num_slots + 1, dtype=torch.bool, device=dev)
        used[torch.where(own, s_prev, trash)] = True
        free_cum = torch.cumsum((~used[: self.num_slots]).to(torch.int64), 0)
        need = ~own & live & ~dense
        rank = torch.cumsum(need.to(torch.int64), 0)  # 1-based rank among requests needing a slot
        new_slot = torch.searchsorted(free_cum, rank)  # first slot where the free count reaches the rank
        new_slot = torch.clamp(new_slot, max=self.trash)
        slot = torch.where(own, s_prev, torch.where(need, new_slot, trash))

        bk = self.block_size_k
        new_ws = torch.clamp(torch.div(L - 1 - self.window, bk, rounding_mode="floor") * bk, min=0)
        ws = torch.where(refresh, new_ws, self.window_start[slot])
        ws = torch.where(dense | ~live, torch.zeros_like(ws), ws)

        # The slot follows the request to the block of its newest token.
        kept = slot != self.trash
        w = torch.where(kept, slot, trash)
        self.slot_key[w] = torch.where(kept, key_now, torch.full_like(key_now, -1))
        self.slot_of_block[torch.where(kept, self._entry(key_now), torch.full_like(key_now, self.block_trash))] = w
        wr = torch.where(refresh & kept, slot, trash)
        self.refresh_len[wr] = L
        self.window_start[wr] = new_ws
        return DecodeMaskPlan(row=slot.to(torch.int32), refresh=refresh & kept, window_start=ws.to(torch.int32))
