"""KV page residency for HiP offload: which logical KV pages live on the device tier and which on the host.

vLLM's scheduler allocates and frees ``N`` logical pages (its block ids). Each HiP layer stores them in two
tiers: a device tier of ``G`` pages and a host tier of ``H = N - G`` pages (pinned host memory that kernels
read through UVA). Kernels take *physical* page ids: ``p < G`` is device page ``p``, ``p >= G`` is host page
``p - G``. ``loc`` (logical -> physical) is a permutation of ``[0, N)`` and ``owner`` its inverse, so every
logical page is stored exactly once, in a fixed total amount of memory: nothing can be lost, leaked or
double freed. vLLM keeps freeing and reusing logical ids; wherever a reused page lives, its new owner simply
overwrites it.

Residency is therefore only a performance policy and never affects results: ``touch`` records the pages a
step used (HiP's top-k selection, the sliding window, the pages being written), and ``rebalance`` swaps the
most recently used host pages with the least recently used device pages. The per-step methods are pure
device tensor arithmetic with static shapes (no host sync, no data-dependent shapes), so they can run every
step and inside CUDA graphs. ``rebalance`` moves pages, so physical tables translated before it are stale:
call it between forward steps, and translate afterwards.

This module imports only torch (and the torch reference kernels), so it is testable without vLLM or a GPU.
"""
from __future__ import annotations

import torch

from vllm_hip.kernels.reference import swap_pages_reference


class KVResidency:
    """Logical -> physical page map shared by all HiP layers of one KV-cache group, with an LRU policy."""

    def __init__(self, num_pages: int, num_device_pages: int, device, max_moves: int, max_write_moves: int = 0):
        if not 0 <= num_device_pages <= num_pages:
            raise ValueError(f"num_device_pages={num_device_pages} must be within [0, num_pages={num_pages}]")
        if max_moves < 0 or max_write_moves < 0:
            raise ValueError(f"max_moves={max_moves} and max_write_moves={max_write_moves} must be >= 0")
        self.num_pages = num_pages
        self.num_device_pages = num_device_pages
        self.num_host_pages = num_pages - num_device_pages
        self.max_moves = max_moves
        # Pages written in a step (a prefill chunk, decode tokens) move to the device on top of max_moves:
        # the step's attention reads them at once, and a long prefill reads its own prefix over and over.
        self.max_write_moves = max_write_moves
        # Pairs per rebalance: fixed, so topk and the swap have static shapes.
        self.k = min(max_moves + max_write_moves, num_device_pages, self.num_host_pages)
        self.device = torch.device(device)
        dev = self.device
        self.loc = torch.arange(num_pages, dtype=torch.int32, device=dev)
        self.owner = torch.arange(num_pages, dtype=torch.int32, device=dev)
        # One extra entry that absorbs the touches of invalid entries (branch-free scatter); -1 = never used.
        self._last_used = torch.full((num_pages + 1,), -1, dtype=torch.int64, device=dev)
        self.last_used = self._last_used[:num_pages]
        self._last_written = torch.full((num_pages + 1,), -1, dtype=torch.int64, device=dev)
        self.last_written = self._last_written[:num_pages]
        self.step = torch.zeros((), dtype=torch.int64, device=dev)
        # hits, lookups, pages_moved, cache fills in one buffer so stats_async needs a single copy.
        self._counters = torch.zeros(4, dtype=torch.int64, device=dev)
        self.hits = self._counters[0]
        self.lookups = self._counters[1]
        self.pages_moved = self._counters[2]
        self.cache_fills = self._counters[3]
        self._host_counters = None
        self._copy_event = None
        self._async_values = (0, 0, 0, 0)

    # ----------------------------------------------------------------------------------------- translation
    def translate_block_table(self, block_table: torch.Tensor) -> torch.Tensor:
        """Logical block table -> physical block table, same shape and dtype; entries outside [0, N) kept."""
        bt = block_table.long()
        ok = (bt >= 0) & (bt < self.num_pages)
        phys = self.loc[torch.where(ok, bt, torch.zeros_like(bt))].long()
        return torch.where(ok, phys, bt).to(block_table.dtype)

    def translate_slots(self, slot_mapping: torch.Tensor, page_size: int) -> torch.Tensor:
        """Logical slot ids (page * page_size + offset) -> physical slot ids; negative slots (padding) kept."""
        s = slot_mapping.long()
        page = torch.div(s, page_size, rounding_mode="floor")
        ok = (s >= 0) & (page < self.num_pages)
        phys = self.loc[torch.where(ok, page, torch.zeros_like(page))].long()
        return torch.where(ok, phys * page_size + (s - page * page_size), s).to(slot_mapping.dtype)

    # ----------------------------------------------------------------------------------------------- usage
    def touch(self, pages: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Mark logical ``pages`` (any shape) used at the current step and count device-tier hits.

        Entries where ``valid`` is False, and ids outside [0, N) (padding such as -1), are ignored.
        """
        p = pages.reshape(-1).long()
        ok = (p >= 0) & (p < self.num_pages)
        if valid is not None:
            ok = ok & valid.reshape(-1)
        idx = torch.where(ok, p, torch.full_like(p, self.num_pages))
        self._last_used.scatter_(0, idx, self.step.expand(idx.shape))
        on_device = self.loc[torch.where(ok, p, torch.zeros_like(p))] < self.num_device_pages
        self._counters[:2].add_(torch.stack([(ok & on_device).sum(), ok.sum()]))

    def touch_slots(self, slot_mapping: torch.Tensor, page_size: int) -> None:
        """``touch`` the pages that a step's logical slot mapping writes (negative slots ignored), and mark them
        written at this step (``rebalance`` promotes written pages first)."""
        s = slot_mapping.long()
        pages = torch.div(s, page_size, rounding_mode="floor")
        self.touch(pages, s >= 0)
        ok = (s >= 0) & (pages < self.num_pages)
        idx = torch.where(ok, pages, torch.full_like(pages, self.num_pages))
        self._last_written.scatter_(0, idx, self.step.expand(idx.shape))

    def count_cache_fills(self, flags: torch.Tensor) -> None:
        """Count the rows of a selection cache (``hip.offload.selection_cache_gib``) a step fills: its decode requests
        whose refresh runs the whole search (``flags`` bool, one per request)."""
        self.cache_fills.add_(flags.sum())

    def advance(self) -> None:
        self.step.add_(1)

    # ---------------------------------------------------------------------------------------------- policy
    def rebalance(self, tiers) -> None:
        """Swap up to ``max_moves`` hot host pages, plus up to ``max_write_moves`` host pages written at this
        step (first), with cold device pages, in ``loc``/``owner`` and in ``tiers``.

        ``tiers``: a callable ``swap(d_idx, h_idx, do)`` (one batched launch, ``kernels/page_swap.py``), or
        (device_tier, host_tier) pairs with pages on dim 0 ([G, ...] and [H, ...]), e.g. every
        layer's K and V caches; each distinct page storage must appear once (a swap applied twice undoes
        itself). Both tensors must be addressable by kernels on ``device`` (the host tier as a UVA view).
        """
        k = self.k
        if k == 0:
            return
        G = self.num_device_pages
        owner = self.owner.long()
        # Score by physical page: 2 x last use, +1 if written at this step. A host page written now outranks
        # every page not used at this step but ties (so never displaces) a device page used now; without
        # writes the order is plain LRU.
        written = (self.last_written[owner] == self.step).long()
        score = 2 * self.last_used[owner] + written
        # topk returns sorted values: promotions hottest first, victims coldest first, so pairing i-th with
        # i-th swaps the largest gains and the active pairs form a prefix.
        hot, h_idx = torch.topk(score[G:], k, largest=True)
        cold, d_idx = torch.topk(2 * self.last_used[owner[:G]] + 1, k, largest=False)
        # Strict: a tie gains nothing and would only cost bandwidth.
        do = hot > cold
        if self.max_write_moves:
            # Written pages sort first; the others keep the max_moves budget.
            n_written = (hot == 2 * self.step + 1).sum()
            do &= torch.arange(k, device=hot.device) < n_written + self.max_moves
        h_phys = h_idx + G
        if callable(tiers):  # a batched swapper (kernels/page_swap.py) over fixed tiers
            tiers(d_idx, h_idx, do)
        else:
            swap_pages_reference(tiers, d_idx, h_idx, do)
        ld = self.owner[d_idx]  # logical pages on the victim device pages
        lh = self.owner[h_phys]  # logical pages on the promoted host pages
        d32, h32 = d_idx.to(torch.int32), h_phys.to(torch.int32)
        self.loc.index_copy_(0, lh.long(), torch.where(do, d32, h32))
        self.loc.index_copy_(0, ld.long(), torch.where(do, h32, d32))
        self.owner.index_copy_(0, d_idx, torch.where(do, lh, ld))
        self.owner.index_copy_(0, h_phys, torch.where(do, ld, lh))
        self.pages_moved.add_(2 * do.sum())

    # ----------------------------------------------------------------------------------------------- stats
    def _stats(self, hits: int, lookups: int, moved: int, fills: int, bytes_per_page: int,
               bytes_per_fill: int) -> dict:
        return dict(hit_rate=hits / lookups if lookups else 0.0, hits=hits, lookups=lookups, pages_moved=moved,
                    bytes_moved=moved * bytes_per_page, device_pages=self.num_device_pages,
                    host_pages=self.num_host_pages, cache_fills=fills, cache_bytes_filled=fills * bytes_per_fill)

    def read_stats(self, bytes_per_page: int = 0, reset: bool = False, bytes_per_fill: int = 0) -> dict:
        """Counters since the last reset (syncs: for logging, off the hot path). hit_rate is 0.0 before any
        lookup; bytes_moved counts one page of ``bytes_per_page`` (all layers, K and V) per page moved;
        cache_bytes_filled one selection-cache row of ``bytes_per_fill`` (all layers) per fill."""
        hits, lookups, moved, fills = self._counters.tolist()
        if reset:
            self._counters.zero_()
        return self._stats(hits, lookups, moved, fills, bytes_per_page, bytes_per_fill)

    def stats_async(self, bytes_per_page: int = 0, bytes_per_fill: int = 0) -> dict:
        """Like ``read_stats`` without a sync: starts a copy of the counters and returns the values of the
        latest earlier copy known to be complete (zeros on the first call)."""
        if self._host_counters is None:
            pin = self.device.type == "cuda"
            self._host_counters = torch.zeros(4, dtype=torch.int64, pin_memory=pin)
        if self._copy_event is None or self._copy_event.query():
            self._async_values = tuple(self._host_counters.tolist())  # host memory, written by a finished copy
        self._host_counters.copy_(self._counters, non_blocking=True)
        if self.device.type == "cuda":
            self._copy_event = torch.cuda.Event()
            self._copy_event.record()
        return self._stats(*self._async_values, bytes_per_page, bytes_per_fill)

    # ------------------------------------------------------------------------------------------- test help
    def check(self) -> None:
        """Assert that ``loc`` is a permutation of [0, N) and ``owner`` its inverse (syncs)."""
        n = self.num_pages
        loc, owner = self.loc.long().cpu(), self.owner.long().cpu()
        assert torch.equal(torch.sort(loc).values, torch.arange(n)), "loc is not a permutation"
        assert torch.equal(owner[loc], torch.arange(n)), "owner is not the inverse of loc"
        assert torch.equal(loc[owner], torch.arange(n)), "loc is not the inverse of owner"
