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
* a request refreshes when it has no valid slot, at each of its first ``mask_refresh_first_steps`` decode steps
  (``first_len[slot]``: its length when it took the slot), or when its length reaches a multiple of
  ``mask_refresh_interval`` (so at most that many steps reuse one mask, and requests of different lengths
  decoding together refresh at different steps); new slots are taken from the slots no request of this step
  keeps (a prefix-sum allocation).

With ``hip.mask_coarse_interval`` (staged refresh) a refresh is *coarse*, the whole search, only at the first
steps, for a new slot, or when the length crosses a multiple of that interval (``coarse_len[slot]``); the other
refreshes rerun the exact stage over the groups the coarse one kept, and the window start stays the coarse one's.

Refreshes therefore happen at positions that depend only on the request itself, never on which other
requests share the batch. Prefill steps (and any step of a request still in its prompt) drop the slot of
the block they end in, so a recycled block never hands over another request's mask. Requests at or below
``dense_below_seq_len`` tokens attend densely and skip the mask; where vLLM's FlashAttention serves, their rows
are handed to it (``dense_to_fa``) and the HiP kernels skip them.
"""
from __future__ import annotations

import torch

from vllm_hip.kernels.reference import block_at, decode_plan_into_reference


class DecodeMaskState:
    """Device-side slot table shared by all HiP layers of one KV-cache group."""

    def __init__(self, num_slots: int, num_blocks: int, device, *, page_size: int, window: int,
                 block_size_k: int, interval: int, dense_below: int, first_steps: int = 0, coarse_interval: int = 0):
        self.num_slots = num_slots
        self.page_size = page_size
        self.window = window
        self.block_size_k = block_size_k
        self.interval = interval
        self.dense_below = dense_below
        self.first_steps = first_steps
        self.coarse_interval = coarse_interval
        n = num_slots + 1  # the last entry absorbs writes we do not want to keep (branch-free scatter)
        self.trash = num_slots
        self.slot_key = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.refresh_len = torch.zeros(n, dtype=torch.int64, device=device)
        self.window_start = torch.zeros(n, dtype=torch.int64, device=device)
        self.first_len = torch.zeros(n, dtype=torch.int64, device=device)
        self.coarse_len = torch.zeros(n, dtype=torch.int64, device=device)  # length at the last coarse refresh
        # Indexed by block id modulo its size (identity when num_blocks covers every id); the last entry
        # absorbs writes we do not keep. A wrong entry is harmless: a lookup must also match slot_key.
        self.num_blocks = num_blocks
        self.slot_of_block = torch.full((num_blocks + 1,), self.trash, dtype=torch.int64, device=device)
        self.block_trash = num_blocks
        self._scratch = None  # the Triton plan's slot bookkeeping (plan_into), allocated at its first use

    @property
    def cache_rows(self) -> int:
        """Rows each layer's mask cache needs (the slots plus the trash row)."""
        return self.num_slots + 1

    def invalidate(self, block_table: torch.Tensor, seq_lens: torch.Tensor, reqs: torch.Tensor) -> None:
        """Prefill steps of ``reqs``: forget any slot keyed by the block their newest token is in."""
        if reqs.numel() == 0:
            return
        r = reqs.long()
        key = block_at(block_table, r, seq_lens.long()[r] - 1, self.page_size)
        s = self.slot_of_block[key % self.num_blocks]
        mine = self.slot_key[s] == key
        self.slot_key[torch.where(mine, s, torch.full_like(s, self.trash))] = -1

    def plan_into(self, block_table, seq_lens, reqs, prompt_step, query_start_loc, out: dict, refresh_out, *,
                  triton: bool, dense_to_fa: bool = False, coarse_out=None) -> None:
        """Decide mask rows and refreshes for decode requests ``reqs`` (indices into the batch), update the
        state, and fill the decode buffers of the step: ``out`` holds the int32 buffers ``req``, ``start``,
        ``length``, ``pos0``, ``window_start`` (0 = dense), ``row`` (row of the per-layer mask cache; rows past
        the requests are padding: length 0, no refresh), ``refresh_out`` the bool refresh flags. ``prompt_step``
        (nonzero per request, or None): one-token steps still in the prompt (e.g. the last prompt token after a
        full prefix-cache hit); they never reuse a mask. ``dense_to_fa``: dense rows get length 0 and their
        length in ``out["fa_len"]`` (a FlashAttention call serves them). ``triton``: in
        one launch of the Triton kernel (CUDA) instead of ~100 small torch ops; the same result
        (``kernels.reference.decode_plan_into_reference``, tests/test_decode_plan.py). ``coarse_out`` (bool, with
        a coarse interval): which refreshes run the whole search."""
        kw = dict(page_size=self.page_size, window=self.window, block_size_k=self.block_size_k,
                  interval=self.interval, dense_below=self.dense_below, first_steps=self.first_steps,
                  dense_to_fa=dense_to_fa, coarse_interval=self.coarse_interval, coarse_len=self.coarse_len)
        state = (self.slot_key, self.refresh_len, self.window_start, self.slot_of_block, self.first_len)
        if not triton:
            decode_plan_into_reference(*state, block_table, seq_lens, reqs, prompt_step, query_start_loc, out,
                                       refresh_out, coarse_out=coarse_out, **kw)
            return
        from vllm_hip.kernels.decode_plan import decode_plan

        if self._scratch is None:
            self._scratch = torch.zeros(2, self.num_slots + 2, dtype=torch.int32, device=self.slot_key.device)
        decode_plan(*state, self._scratch, block_table, seq_lens, reqs, prompt_step, query_start_loc, out,
                    refresh_out, coarse_out=coarse_out, **kw)
