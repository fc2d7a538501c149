"""HipConfig: every user-facing knob of vllm-hip, read once from ``additional_config["hip"]`` and validated.

Users set it with ``vllm serve ... --additional-config '{"hip": {"k": 1024}}'`` or
``LLM(..., additional_config={"hip": {...}})``. Defaults follow the HiP paper (hip.md) except ``block_size_k``
(8 instead of 2, chosen by measurement); an unknown key or a bad value raises ``HipConfigError`` naming the key
and the fix.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field, fields


class HipConfigError(ValueError):
    """A bad ``additional_config["hip"]`` value; the message names the key and how to fix it."""


@dataclass(frozen=True)
class HipOffloadConfig:
    """KV offload to host memory (``vllm_hip.kv_offload``): vLLM's KV pool grows by the pages that fit in
    ``host_gib``; each HiP layer keeps ``gpu_blocks`` pages on the GPU and the rest in pinned host memory, and
    pages move between the two by recency of use. Dense layers keep every page on the GPU. vLLM 0.26 layout."""

    host_gib: float = 0.0
    """Pinned host memory for KV pages of the HiP layers, GiB (per GPU); 0 disables offload."""
    gpu_blocks: int = 0
    """KV blocks of each HiP layer kept in GPU memory (shared by all requests); 0 = all the GPU KV memory vLLM
    finds. Must hold the hot set of the running requests (sink + window + selected blocks) to run fast."""
    max_moves: int = 64
    """Pages swapped between host and GPU per step (promotions of recently used host pages). Pages a step
    writes (prefill chunks, decode tokens) move to the GPU first, on top of this budget."""
    selection_cache_gib: float = 16.0
    """GPU memory the selection cache may take, GiB; 0 = off. The cache keeps, per decode slot (``max_num_seqs``,
    or ``mask_cache_slots``) and HiP layer, the keys and values of the candidates a whole search hands to the exact
    stage (``mask_exact_blocks`` x ``k`` tokens: 32 MiB per slot and layer at the defaults with Llama-3.1-8B's 8 KV
    heads of 128, bf16). The search fills it from wherever the pages are; the exact-only refreshes of the staged
    refresh and every decode step's attention then read selected blocks from it, not from host memory, and the
    residency policy no longer chases the selection. Same keys, same tokens. It is used when one row per slot fits
    this budget and the staged refresh is on (``mask_coarse_interval`` > 0); otherwise offload runs without it and
    says why at start-up (e.g. lower ``--max-num-seqs``). Its memory comes out of the GPU KV budget
    (``gpu_blocks`` is what is left for pages)."""

    @property
    def enabled(self) -> bool:
        return self.host_gib > 0


@dataclass(frozen=True)
class HipConfig:
    """HiP attention settings. Docstrings of the fields are the documentation (README's config table)."""

    k: int = 1024
    """Tokens selected per query block by the hierarchical top-k (excluding sink and window). 1024 rather than
    512: on SmolLM2 it keeps perplexity within 1 % of dense at 8K (512: +2.0-2.3 %) and finds 96 % of the exact
    top key blocks at 4K (512: 86 %) (BENCHMARKS.md, "Quality"); long contexts on GPUs usually want 2048."""
    block_size_q: int = 64
    """Queries per query block: one mask is estimated per block of this many consecutive queries."""
    block_size_k: int = 8
    """Tokens per key block, the unit of selection. ``k`` must be a multiple of it. (The paper uses 2; 8 measured
    better on passkey retrieval and runs faster on GPUs: BENCHMARKS.md, "Quality".)"""
    query_stride: int = 2
    """Score every n-th query of a block during mask estimation (1 = all)."""
    mask_exact_blocks: int = 8
    """The hierarchical search halves its ``n`` candidate groups only until none spans more than this many key
    blocks; then every block of the surviving groups is scored by its own keys and the best ``n`` are kept. 1 is
    plain HiP v3 (every group halved down to one block, each half judged by its centre block). 8 reads about as
    many keys as v3 and, at 8K on SmolLM2, finds the exact top blocks (the whole search is one exact round when
    there are at most 8n candidates): passkey margins lost to pruning fall from 0.69 to 0.21 nats
    (BENCHMARKS.md §4). A power of two, at most 16 (the exact round ranks n times this many scores in one
    program)."""
    normalised_score: bool = True
    """Judge candidate key blocks by each query head's logit *minus that head's best logit over its sink and
    window keys* (which it attends anyway), instead of by the raw logit. The selection takes the max over a KV
    group's query heads; with raw logits a head whose far keys add nothing to what it already attends can outbid
    a retrieval head of the same group that needs one far block. On SmolLM2 at 8K it turns a missed passkey into
    a right one with no prompt lost (BENCHMARKS.md §4). Costs one pass over the sink and window keys per query
    block and KV head before the search (``sink_tokens + sliding_window`` keys). Needs ``sliding_window`` > 0."""
    norm_window: int = 1024
    """Keys at the start of the sliding window over which ``normalised_score`` takes each head's best logit (with
    the sink's); 0 or more than ``sliding_window``: the whole window. 1024 is the reference the score was validated
    with (window 1024 then); with window 2048 it costs 1.3 ms less per layer of mask at a 128K prefill on an H200,
    while SmolLM2's 8K top-k recall (0.927 vs 0.929) and Qwen2.5-Coder's 32K perplexity (+1.13 vs +1.08 % of dense)
    stay within noise of the whole window (BENCHMARKS.md §4)."""
    sink_tokens: int = 128
    """First tokens every query attends to (attention sinks). Must be a multiple of ``block_size_k``."""
    sliding_window: int = 2048
    """Most recent tokens every query attends to, on top of the selected blocks. A query's true top keys are
    mostly recent: on SmolLM2 at 8K, token-level top-k recall is 0.84 with 1024, 0.90 with 1536 and 0.93 with
    2048 (BENCHMARKS.md §4). The H200 benchmarks run 2048 too (with k 1024: the paper's 3,200-key budget)."""
    dense_layers: tuple[int, ...] = (0, 1, 2)
    """Layer indices that keep dense attention (the paper keeps the first 3 dense)."""
    dense_below_seq_len: int = 0
    """Requests whose context (tokens so far) is at most this use dense attention; 0 = HiP wherever it prunes.
    On CUDA (fp16/bf16) vLLM's FlashAttention serves them, prefill and decode (decode in batches of 9 or more; in
    smaller ones the HiP kernel attends them densely), unless KV offload is on."""
    prefill_dense_below_seq_len: int = 0
    """Prefill only: a prompt chunk whose request reaches at most this many tokens with it attends densely;
    0 = ``dense_below_seq_len``, otherwise at least that. Decode keeps ``dense_below_seq_len``. On an H200, HiP's
    prefill kernels beat FlashAttention-3 only past ~32K tokens per 16K chunk (~64K for a whole prompt) while HiP
    decode wins from ~16K (BENCHMARKS.md), so GPU servers want a higher threshold here than for decode. With KV
    offload those chunks run on our Triton kernel instead (FlashAttention cannot read host pages), which is slower
    than HiP's at these lengths: leave it at 0 there."""
    mask_refresh_interval: int = 8
    """A request re-estimates its decode mask at its first decode steps (``mask_refresh_first_steps``) and
    whenever its length reaches a multiple of this (1 = every step): at most this many steps share one mask, and
    requests of different lengths decoding together refresh at different steps."""
    mask_refresh_first_steps: int = 8
    """A request re-estimates its decode mask at every one of its first this many decode steps (again after a
    preemption), then every ``mask_refresh_interval``. The answer's first tokens are where one mask reused over
    several steps costs the most: on SmolLM2 at 8K a 5-digit passkey lost its last digit to a mask kept from the
    first digit (BENCHMARKS.md §4). 0 or 1: only the first step."""
    mask_coarse_interval: int | None = None
    """Staged refresh (InfiniteHiP's per-stage intervals): a decode refresh reruns the whole search only when the
    request's length reaches a multiple of this (and at its first steps); the refreshes in between rerun only the
    exact last stage (``mask_exact_blocks``) over the groups the last whole search kept, and keep its window start.
    0 = every refresh runs the whole search. A multiple of ``mask_refresh_interval``; needs ``mask_exact_blocks``
    > 1. Default (unset): 8 x ``mask_refresh_interval`` (64 at the defaults) when ``mask_exact_blocks`` > 1, else 0.
    On Qwen2.5-Coder at 32K (two texts, 128 decode steps, simulated) 64 keeps interval 8's decode recall (0.612 /
    0.606 against 0.609 / 0.604 with every refresh a whole search) where interval 16 loses 0.009-0.011
    (BENCHMARKS.md §4); on the H200 (6 x 128K, full batch, HIP alone) it runs 4.7 % faster than 0 and 2.5 % faster
    than 32 (§2). Measured at 32K only: at 128K the halving rounds prune more, and what a 64-step-old coarse search
    costs there is not measured."""
    mask_cache_slots: int = 0
    """Decode mask slots per layer (one per decoding request); 0 = max_num_seqs."""
    record_stats: bool = False
    """Count attended vs causal keys per layer (``vllm_hip.stats``); adds small device ops per layer."""
    offload: HipOffloadConfig = field(default_factory=HipOffloadConfig)

    def __post_init__(self):
        if self.mask_coarse_interval is None:  # the documented default follows the two knobs it depends on
            object.__setattr__(self, "mask_coarse_interval",
                               8 * self.mask_refresh_interval if self.mask_exact_blocks > 1 else 0)

    @property
    def prefill_dense_below(self) -> int:
        """The effective prefill threshold (``prefill_dense_below_seq_len``, or ``dense_below_seq_len`` if 0)."""
        return self.prefill_dense_below_seq_len or self.dense_below_seq_len

    @property
    def n_select(self) -> int:
        """Key blocks selected per query block."""
        return self.k // self.block_size_k

    @property
    def mask_kwargs(self) -> dict:
        """The selection settings every mask op takes (``ops.mask``, the kernels, the reference)."""
        return dict(n_select=self.n_select, block_size_q=self.block_size_q, block_size_k=self.block_size_k,
                    sink_tokens=self.sink_tokens, query_stride=self.query_stride, exact_blocks=self.mask_exact_blocks,
                    norm_window=self.norm_keys)

    @property
    def norm_keys(self) -> int:
        """Window keys the normalised score's reference reads (0 when the score is raw)."""
        if not self.normalised_score:
            return 0
        return min(self.norm_window, self.sliding_window) if self.norm_window else self.sliding_window

    # ------------------------------------------------------------------------------------ parsing
    @classmethod
    def from_dict(cls, raw: dict | str | None) -> "HipConfig":
        """Build and validate from the ``"hip"`` section (a dict or its JSON text)."""
        if raw is None:
            raw = {}
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise HipConfigError(f'additional_config["hip"] is not valid JSON: {e}') from None
        if not isinstance(raw, dict):
            raise HipConfigError(f'additional_config["hip"] must be a JSON object, got {type(raw).__name__}')
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise HipConfigError(
                f'unknown key(s) {unknown} in additional_config["hip"]; valid keys: {sorted(known)}'
            )
        kwargs = {}
        for name, value in raw.items():
            if name == "offload":
                kwargs[name] = _parse_offload(value)
            elif name in ("record_stats", "normalised_score"):
                if not isinstance(value, bool):
                    raise HipConfigError(f"hip.{name} must be true or false, got {value!r}")
                kwargs[name] = value
            elif name == "dense_layers":
                if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
                    raise HipConfigError(f"hip.dense_layers must be a list of layer indices, got {value!r}")
                kwargs[name] = tuple(sorted(set(int(v) for v in value)))
            else:
                if not _is_int(value):
                    raise HipConfigError(f"hip.{name} must be an integer, got {value!r}")
                kwargs[name] = int(value)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ``HipConfigError`` for inconsistent values."""
        positive = ("k", "block_size_q", "block_size_k", "query_stride", "mask_refresh_interval", "mask_exact_blocks")
        for name in positive:
            if getattr(self, name) <= 0:
                raise HipConfigError(f"hip.{name} must be > 0, got {getattr(self, name)}")
        for name in ("sink_tokens", "sliding_window", "norm_window", "dense_below_seq_len", "prefill_dense_below_seq_len",
                     "mask_cache_slots", "mask_refresh_first_steps", "mask_coarse_interval"):
            if getattr(self, name) < 0:
                raise HipConfigError(f"hip.{name} must be >= 0, got {getattr(self, name)}")
        if 0 < self.prefill_dense_below_seq_len < self.dense_below_seq_len:
            raise HipConfigError(
                f"hip.prefill_dense_below_seq_len ({self.prefill_dense_below_seq_len}) must be 0 or at least "
                f"hip.dense_below_seq_len ({self.dense_below_seq_len}): prompts that short decode densely anyway; "
                f"set it to 0 to follow dense_below_seq_len")
        if self.normalised_score and self.sliding_window == 0:
            raise HipConfigError("hip.normalised_score needs the sliding window's keys to normalise by: set "
                                 "hip.sliding_window > 0 or hip.normalised_score to false")
        bk = self.block_size_k
        if bk & (bk - 1):
            raise HipConfigError(f"hip.block_size_k must be a power of two, got {bk}")
        e = self.mask_exact_blocks
        if e & (e - 1) or e > 16:  # the exact round ranks n * e scores in one program
            raise HipConfigError(f"hip.mask_exact_blocks must be a power of two up to 16, got {e}")
        c, r = self.mask_coarse_interval, self.mask_refresh_interval
        if c and (c % r or e == 1):
            raise HipConfigError(
                f"hip.mask_coarse_interval ({c}) must be 0 or a multiple of hip.mask_refresh_interval ({r}), with "
                f"hip.mask_exact_blocks > 1 (now {e}): the refreshes in between rerun the exact stage; try "
                f"mask_coarse_interval={-(-c // r) * r}" + (" and mask_exact_blocks=8" if e == 1 else ""))
        if self.k % bk:
            raise HipConfigError(
                f"hip.k ({self.k}) must be a multiple of hip.block_size_k ({bk}); try k={self.k // bk * bk or bk}"
            )
        if self.sink_tokens % bk:
            raise HipConfigError(
                f"hip.sink_tokens ({self.sink_tokens}) must be a multiple of hip.block_size_k ({bk})"
            )
        if self.query_stride > self.block_size_q:
            raise HipConfigError(
                f"hip.query_stride ({self.query_stride}) must be <= hip.block_size_q ({self.block_size_q})"
            )
        if any(i < 0 for i in self.dense_layers):
            raise HipConfigError(f"hip.dense_layers must hold non-negative indices, got {list(self.dense_layers)}")
        off = self.offload
        if off.gpu_blocks < 0 or off.host_gib < 0 or off.max_moves < 0 or off.selection_cache_gib < 0:
            raise HipConfigError("hip.offload.gpu_blocks, hip.offload.host_gib, hip.offload.max_moves and "
                                 "hip.offload.selection_cache_gib must be >= 0")
        if off.gpu_blocks and not off.host_gib:
            raise HipConfigError("hip.offload.gpu_blocks is set but hip.offload.host_gib is 0: set host_gib (GiB of "
                                 "pinned host memory for KV) to enable offload")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dense_layers"] = list(self.dense_layers)
        return d


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_offload(value) -> HipOffloadConfig:
    if not isinstance(value, dict):
        raise HipConfigError(f"hip.offload must be an object like {{'gpu_blocks': 4096, 'host_gib': 64}}, got {value!r}")
    known = {f.name for f in fields(HipOffloadConfig)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise HipConfigError(f"unknown key(s) {unknown} in hip.offload; valid keys: {sorted(known)}")
    gb = value.get("gpu_blocks", 0)
    hg = value.get("host_gib", 0.0)
    mm = value.get("max_moves", HipOffloadConfig.max_moves)
    sc = value.get("selection_cache_gib", HipOffloadConfig.selection_cache_gib)
    for name, v in (("gpu_blocks", gb), ("max_moves", mm)):
        if not _is_int(v):
            raise HipConfigError(f"hip.offload.{name} must be an integer, got {v!r}")
    if not isinstance(hg, (int, float)) or isinstance(hg, bool):
        raise HipConfigError(f"hip.offload.host_gib must be a number, got {hg!r}")
    if not isinstance(sc, (int, float)) or isinstance(sc, bool):
        raise HipConfigError(f"hip.offload.selection_cache_gib must be a number (GiB; 0 = off), got {sc!r}")
    return HipOffloadConfig(host_gib=float(hg), gpu_blocks=int(gb), max_moves=int(mm), selection_cache_gib=float(sc))


def hip_config_from_vllm(vllm_config) -> HipConfig:
    """The HipConfig of a running engine (``vllm_config.additional_config["hip"]``), parsed once per process."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    raw = extra.get("hip")
    key = raw if isinstance(raw, str) else json.dumps(raw, sort_keys=True, default=str)
    return _parse_cached(key)


@functools.lru_cache(maxsize=8)
def _parse_cached(key: str) -> HipConfig:
    return HipConfig.from_dict(json.loads(key))
