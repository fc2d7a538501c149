"""The HIP attention backend: backend class (static capabilities), metadata builder, and impl.

Shaped like vLLM's own ``triton_attn.py``. The builder turns a step's ragged batch into query blocks once
per step (shared by all layers); the impl's ``forward`` launches mask estimation and block-sparse attention
(``vllm_hip.ops``) and never syncs the host on CUDA.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm_hip import compat, ops, stats
from vllm_hip.compat import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm_hip.config import HipConfig, HipConfigError, hip_config_from_vllm
from vllm_hip.kernels.reference import make_query_blocks, mask_group_width, window_starts
from vllm_hip.kv_offload import (
    LAST_STATS,
    HostTiers,
    alloc_selection_cache,
    is_dense_layer,
    layer_index,
    selection_cache_rows,
)
from vllm_hip.mask_state import DecodeMaskState

logger = compat.init_logger(__name__)

SUPPORTED_HEAD_SIZES = [32, 64, 128, 256]
# Dtypes vLLM's FlashAttention takes (it is tried only where the Triton kernels run, i.e. on CUDA).
FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)


class HipAttentionBackend(AttentionBackend):
    """HiP: sink + sliding window + hierarchically selected key blocks, over vLLM's paged KV cache."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "HIP"

    @staticmethod
    def get_impl_cls() -> type["HipAttentionImpl"]:
        return HipAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["HipMetadataBuilder"]:
        return HipMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return SUPPORTED_HEAD_SIZES

    # vLLM 0.26 asks the backend for the cache shape; 0.32+ never calls these.
    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False):
        # Physical [blocks, page, heads, 2*hs] (NHD): one token's K and V rows of all heads are adjacent.
        return (1, 0, 3, 2, 4) if include_num_layers_dimension else (0, 2, 1, 3)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def check_selector_config(cls, sel) -> None:
        """Raise a clear error for a layer HIP cannot serve (used where the platform does not validate)."""
        reasons = cls.validate_configuration(device_capability=None, **sel._asdict())
        if reasons:
            raise ValueError(
                f"The HIP attention backend cannot run this model layer: {', '.join(reasons)}. "
                f"HIP supports decoder self-attention of non-MLA models, head sizes {SUPPORTED_HEAD_SIZES}, "
                f"dtypes fp16/bf16/fp32 and an unquantised KV cache. Use another --attention-backend, or "
                f"attention_config.backend_per_kind to keep such layers on it."
            )


@dataclass
class QueryBlocks:
    """Query blocks of one kind (prefill or decode) of a step: int32 tensors, one entry per block."""

    req: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    pos0: torch.Tensor
    window_start: torch.Tensor  # for HiP layers
    dense_window_start: torch.Tensor  # zeros: dense layers
    # Decode only: per-request mask-cache row and refresh flag.
    mask_row: torch.Tensor | None = None
    refresh: torch.Tensor | None = None
    coarse: torch.Tensor | None = None  # staged refresh (hip.mask_coarse_interval): refreshes that run the whole search
    # Decode only: the rows at or below hip.dense_below_seq_len as one FlashAttention call for the HiP layers
    # (their ``length`` is 0, so the HiP kernels skip them); None where the HiP kernels serve them densely.
    dense_rows: "DensePrefill | None" = None

    @property
    def count(self) -> int:
        return self.req.shape[0]


@dataclass
class DensePrefill:
    """The prefill (or decode) requests of a step as one FlashAttention varlen call: used by the dense layers,
    and for prefill by every layer when all prefill requests are at most ``hip.prefill_dense_below_seq_len`` long.
    Decode requests come first and prefill requests follow (the builder asks vLLM to reorder), so each kind is
    one contiguous run of rows and tokens: ``token_start`` to ``token_end`` (None: to the end)."""

    token_start: int
    cu_seqlens_q: torch.Tensor
    seqused_k: torch.Tensor
    block_table: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    all_layers: bool
    token_end: int | None = None
    num_splits: int = 0  # FlashAttention-3's split-K count (0: its own heuristic); decode calls set it


# Decode batches (graph sizes) from which a HiP layer hands its short rows (at most hip.dense_below_seq_len) to
# FlashAttention. The call costs 7-9 us per HiP layer and step on the H200 even when no row is short (29 layers: ~0.25
# ms of a 9 ms step at 128K x 6); in graphs of up to 8 rows the HiP kernel attends rows of 4K-16K densely within
# -10/+6 % of it (16K: 111.0 against 104.8 us for 6 rows in the graph of 8), while at 16 rows FlashAttention is
# 1.3x faster (8K: 131 against 174 us). bench_decode_splits.py --dense, BENCHMARKS.md §1 (2026-12-03 19:19).
HAND_OVER_MIN_ROWS = 9


def fa_decode_splits(rows: int, num_kv_heads: int, num_sms: int) -> int:
    """FlashAttention-3 split count for a decode call of ``rows`` requests (one query token each): as many splits
    as keep its CTAs (``rows x kv heads x splits``, query heads packed per KV head) within one wave of the SMs.

    FA3's own choice overshoots that wave at mid batch sizes: on the H200 at 128K and 6 requests it runs 3 splits,
    144 CTAs on 132 SMs, 1027 us per layer; 2 splits take 748 us (858 with the 2 padding rows of the captured graph
    of 8), and at 8K and 32K 2 splits are 20-25 % faster too. Batch 16 (1 split) and batch 1 (16) come out as fast
    as FA3's choice (``benchmarks/bench_dense_decode.py``, BENCHMARKS.md §2, 2026-12-02 20:05)."""
    return max(1, num_sms // max(1, rows * num_kv_heads))


@dataclass
class HipMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    prefill: QueryBlocks | None
    decode: QueryBlocks | None
    no_indices: torch.Tensor  # [1, Hkv, 1] of -1: dense layers select nothing
    mask_caches: dict[str, torch.Tensor]  # layer name -> decode masks [rows, Hkv, n] (persistent)
    # staged refresh: layer name -> (lo, hi) of the groups the exact stage rescores, [rows, Hkv, p2(n)] (persistent)
    mask_groups: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    dense_prefill: DensePrefill | None = None  # set where vLLM's FlashAttention can serve dense prefill
    dense_decode: DensePrefill | None = None  # the same for the dense layers' decode rows
    # KV offload (hip.offload): HiP layers address pages through these physical tables, two tiers each.
    kv_block_table: torch.Tensor | None = None
    kv_slot_mapping: torch.Tensor | None = None
    host_kv: dict[str, torch.Tensor] | None = None  # layer name -> host tier (UVA view), same layout as kv_cache
    # hip.offload.selection_cache_gib: layer name -> (keys, values, pick) of the decode rows' exact-stage candidates
    selection_cache: dict[str, tuple] | None = None


class HipMetadataBuilder(AttentionMetadataBuilder[HipMetadata]):
    _cudagraph_support: ClassVar = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.cfg: HipConfig = hip_config_from_vllm(vllm_config)
        self.page_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        max_seqs = vllm_config.scheduler_config.max_num_seqs
        slots = self.cfg.mask_cache_slots or max_seqs
        if slots < max_seqs:
            raise HipConfigError(f"hip.mask_cache_slots ({slots}) must be 0 or at least max_num_seqs ({max_seqs}): "
                                 f"every decoding request needs its own mask slot")
        # Block ids in the block table index a per-block slot map: size it by the KV pool (in kernel pages).
        cache = vllm_config.cache_config
        num_blocks = (cache.num_gpu_blocks or 0) * max(1, cache.block_size // self.page_size) or (1 << 20)
        self.decode_state = DecodeMaskState(
            slots, num_blocks, device, page_size=self.page_size, window=self.cfg.sliding_window,
            block_size_k=self.cfg.block_size_k, interval=self.cfg.mask_refresh_interval,
            dense_below=self.cfg.dense_below_seq_len, first_steps=self.cfg.mask_refresh_first_steps,
            coarse_interval=self.cfg.mask_coarse_interval,
        )
        self.no_indices = torch.full((1, self.num_kv_heads, 1), -1, dtype=torch.int32, device=device)
        # Decode metadata lives in persistent buffers, so a captured decode graph reads this step's values.
        i32 = dict(dtype=torch.int32, device=device)
        self._dec = {name: torch.zeros(max_seqs, **i32)
                     for name in ("req", "start", "length", "pos0", "window_start", "zeros", "row", "fa_len")}
        self._dec_refresh = torch.zeros(max_seqs, dtype=torch.bool, device=device)
        self._dec_coarse = (torch.zeros(max_seqs, dtype=torch.bool, device=device)
                            if self.cfg.mask_coarse_interval else None)  # staged refresh: coarse flags
        self._dec_cu = torch.arange(max_seqs + 1, dtype=torch.int32, device=device)  # one query token per request
        self._max_model_len = vllm_config.model_config.max_model_len
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        # Decode masks of every layer of this group. Allocated at the first build, i.e. outside any CUDA-graph
        # capture (an allocation captured with its fill would reset the cache at every replay).
        self._mask_caches: dict[str, torch.Tensor] | None = None
        self._mask_groups = None
        # Dense prefill goes to vLLM's FlashAttention where it exists and takes the dtype (fp16/bf16 on CUDA):
        # it runs near the roofline, our Triton kernel at a quarter of it.
        self._fa_ok = False
        dtype = vllm_config.model_config.dtype
        if ops.on_triton(self.no_indices) and dtype in FLASH_ATTN_DTYPES:
            try:
                why_not = ops.flash_attn_check(device, dtype, kv_cache_spec.head_size, self.num_kv_heads,
                                               self.page_size)
            except Exception as e:  # the check itself failed: keep the path that is known to work
                why_not = f"check failed: {e!r}"[:300]
            self._fa_ok = why_not is None
            if why_not:  # same (dense) result, from the slower Triton kernel: say so
                logger.warning("HIP: dense attention stays on the Triton kernel: %s", why_not)
            else:
                logger.info("HIP: dense attention (hip.dense_layers; prefill at or below "
                            "hip.prefill_dense_below_seq_len, decode at or below hip.dense_below_seq_len) runs on "
                            "vLLM's FlashAttention")
        # Decode rows at or below hip.dense_below_seq_len in HiP layers: FlashAttention too (one more launch per
        # layer and step; the HiP kernels skip those rows). Offloaded layers have host pages FA cannot address.
        self._dense_rows_fa = self._fa_ok and self.cfg.dense_below_seq_len > 0 and not self.cfg.offload.enabled
        # ... except in decode batches of up to 8 requests (HAND_OVER_MIN_ROWS), whose graph holds that call (its
        # prepare, forward and combine kernels) whether or not a row is short, and where the HiP kernel attends short
        # rows densely about as fast. The choice follows the size of the graph a batch replays, so capture and
        # replay agree.
        self._graph_sizes = compat.full_decode_graph_sizes(vllm_config) or []
        if ops.on_triton(self.no_indices):  # compile the HiP kernels now, not in the first long request's steps
            t0 = time.perf_counter()
            try:
                width = -(-vllm_config.model_config.max_model_len // self.page_size)
                heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
                ops.compile_kernels(device, dtype, num_heads=heads, num_kv_heads=self.num_kv_heads,
                                    head_size=kv_cache_spec.head_size, page_size=self.page_size,
                                    block_table_width=width, cfg=self.cfg, host_tier=self.cfg.offload.enabled)
                for prompt in (True, False):
                    for to_fa in {False, self._dense_rows_fa}:
                        self.decode_state.plan_into(*self._plan_warmup_args(device, width, prompt), triton=True,
                                                    dense_to_fa=to_fa, coarse_out=self._dec_coarse)
                logger.info("HIP: Triton kernels compiled in %.1f s", time.perf_counter() - t0)
            except Exception as e:  # only a warm-up: the kernels then compile at their first use
                logger.warning("HIP: kernel warm-up failed (%r); kernels will compile at first use", e)
        # KV offload: host tiers and residency are built at the first step, once vLLM has bound the KV tensors.
        self._offload = None
        self._offload_step = 0
        self._vllm_config = vllm_config
        # Decode requests first, so prefill and decode blocks are contiguous runs.
        self._init_reorder_batch_threshold(1)
        if device.type == "cuda":
            full_sizes = compat.full_decode_graph_sizes(vllm_config)
            gap = eager_decode_batches(full_sizes, max_seqs)
            if gap:
                logger.warning(
                    "HIP: decode batches of %d-%d requests get no full CUDA graph (capture sizes up to "
                    "max_num_seqs=%d: %s) and run HiP attention eagerly, ~0.7 ms of host time per layer on an "
                    "H200; add %d to compilation_config.cudagraph_capture_sizes to capture them",
                    gap[0], gap[1], max_seqs, full_sizes, max_seqs)

    def _plan_warmup_args(self, device, width: int, prompt: bool):
        """A decode plan of no requests (only the padding rows are written): compiles the plan kernel."""
        i32 = dict(dtype=torch.int32, device=device)
        none = torch.zeros(0, **i32)
        return (torch.zeros(1, width, **i32), torch.zeros(1, **i32), none, none if prompt else None,
                torch.zeros(2, **i32), self._dec, self._dec_refresh)

    def _is_dense_layer(self, name: str) -> bool:
        return is_dense_layer(self.cfg, name)

    def _h2d_rows(self, host: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Host ``[R, n]`` -> R int32 device rows from one copy, each starting 16-byte aligned: Triton keys its
        compiled kernels on pointer alignment, so a row at an unaligned offset (n not a multiple of 4) would
        compile a second variant of every kernel in the middle of serving (seen on the H200)."""
        r, n = host.shape
        padded = torch.zeros(r, max(4, -(-n // 4) * 4), dtype=torch.int32)
        padded[:, :n] = host
        return tuple(row[:n] for row in self._h2d(padded).unbind(0))

    def _h2d(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor -> int32 on the device, without blocking the host on CUDA."""
        t = t.to(torch.int32)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> HipMetadata:
        # Capture runs with dummy block tables: never let it leave decode mask state behind.
        md = self.build(0, common_attn_metadata)
        self.decode_state.slot_key.fill_(-1)
        return md

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HipMetadata:
        cm = common_attn_metadata
        R = cm.num_reqs
        qsl_cpu = cm.query_start_loc_cpu[: R + 1]
        q_lens = (qsl_cpu[1:] - qsl_cpu[:-1]).to(torch.int64)
        is_decode = q_lens == 1
        dec_reqs = torch.nonzero(is_decode).flatten()  # host tensors: no device sync
        pf_reqs = torch.nonzero(~is_decode & (q_lens > 0)).flatten()
        seq_lens = cm.seq_lens[:R]
        block_table = cm.block_table_tensor[:R]
        state = self.decode_state

        prefill = dense_prefill = None
        if pf_reqs.numel():
            prefill = self._prefill_blocks(qsl_cpu, q_lens, pf_reqs, seq_lens, compat.seq_lens_host(cm))
            state.invalidate(block_table, seq_lens, self._h2d(pf_reqs))
            dense_prefill = self._dense_prefill(cm, qsl_cpu, q_lens, pf_reqs) if self._fa_ok else None
        n_dec = dec_reqs.numel()
        # FlashAttention takes decode rows only as one run at the front of the batch (the reorder asked for in
        # __init__); otherwise the Triton path serves them all.
        dec_fa = self._fa_ok and n_dec > 0 and int(dec_reqs[-1]) == n_dec - 1
        decode = self._decode_blocks(cm, dec_reqs, seq_lens, block_table, dec_fa) if n_dec else None
        # The dense layers' decode rows are as long as the model admits (FlashAttention reads no key past
        # max_seqlen_k by contract; hip.dense_below_seq_len bounds only the HiP layers' hand-over rows).
        dense_decode = self._decode_rows_fa(cm, n_dec, cm.seq_lens[:n_dec], self._max_model_len) if dec_fa else None
        if self._mask_caches is None:
            hip_layers = [name for name in self.layer_names if not self._is_dense_layer(name)]
            # One tensor for all layers, so offload reads every layer's selection in one gather. Rows padded to a
            # multiple of 4, so every layer's slice starts 16-byte aligned like the start-up warm-up's (Triton
            # keys compiled kernels on pointer alignment); the padding rows are never selected.
            rows = -(-state.cache_rows // 4) * 4
            self._mask_stack = torch.full((len(hip_layers), rows, self.num_kv_heads, self.cfg.n_select),
                                          -1, dtype=torch.int32, device=self.device)
            self._mask_caches = {name: self._mask_stack[i] for i, name in enumerate(hip_layers)}
            if self.cfg.mask_coarse_interval:  # the staged refresh's groups, per layer and row
                width = mask_group_width(self.cfg.n_select)
                g = torch.zeros((2, len(hip_layers), rows, self.num_kv_heads, width), dtype=torch.int32,
                                device=self.device)
                self._mask_groups = {name: (g[0, i], g[1, i]) for i, name in enumerate(hip_layers)}
        tiers = self._offload_tables(cm, seq_lens, block_table, decode) if self.cfg.offload.enabled else None
        return HipMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            query_start_loc=cm.query_start_loc,
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=cm.slot_mapping,
            prefill=prefill,
            decode=decode,
            no_indices=self.no_indices,
            mask_caches=self._mask_caches,
            mask_groups=self._mask_groups,
            dense_prefill=dense_prefill,
            dense_decode=dense_decode,
            **(tiers or {}),
        )

    def _offload_tables(self, cm, seq_lens, block_table, decode) -> dict:
        """KV offload, once per step: mark the pages this step uses, move hot ones to the GPU, translate tables."""
        cfg, page = self.cfg, self.page_size
        if self._offload is None:
            hip_layers = list(self._mask_caches)
            sched = self._vllm_config.scheduler_config
            # pages one step can write: its token budget, a partial page per request at most on top
            write_moves = -(-sched.max_num_batched_tokens // page) + sched.max_num_seqs
            layer_kv = {n: compat.layer_kv_cache(self._vllm_config, n) for n in hip_layers}
            self._offload = HostTiers(cfg, layer_kv, page, self.device, write_moves=write_moves)
            self._selection_cache = None
            self._fill_bytes = 0
            kv = next(iter(layer_kv.values()))
            rows, _ = selection_cache_rows(cfg, sched.max_num_seqs, self.num_kv_heads, kv.shape[-1] // 2,
                                           kv.element_size(), len(hip_layers))
            if rows:  # planned into the GPU budget by kv_offload.plan_offload, which logs why when it is not used
                assert rows == self.decode_state.cache_rows, "selection cache rows and mask rows disagree"
                self._selection_cache = {
                    n: alloc_selection_cache(cfg, rows, self.num_kv_heads, kv.shape[-1] // 2, kv.dtype, self.device,
                                             self._mask_caches[n]) for n in hip_layers}
                ck, cv, _ = next(iter(self._selection_cache.values()))
                self._fill_bytes = len(hip_layers) * (ck[0].nbytes + cv[0].nbytes)  # one row, every layer
            cache = self._vllm_config.cache_config
            pool = (cache.num_gpu_blocks or 0) * max(1, cache.block_size // page)  # set where the core shares it
            if pool and pool != self._offload.residency.num_pages:
                raise RuntimeError(f"HiP KV offload: vLLM's pool has {pool} blocks but the tiers hold "
                                   f"{self._offload.residency.num_pages} pages; the KV-cache plan and the worker disagree")
            self._phys_bt = torch.zeros((sched.max_num_seqs, cm.block_table_tensor.shape[1]),
                                        dtype=cm.block_table_tensor.dtype, device=self.device)
            self._phys_slots = torch.full((sched.max_num_batched_tokens,), -1, dtype=cm.slot_mapping.dtype,
                                          device=self.device)
            i64 = dict(dtype=torch.int64, device=self.device)
            self._window_cols = torch.arange(-(-cfg.sliding_window // page) + 1, **i64)
            self._sink_cols = torch.arange(max(1, -(-cfg.sink_tokens // page)), **i64)
        res = self._offload.residency
        res.advance()
        T, R, W = cm.num_actual_tokens, block_table.shape[0], block_table.shape[1]
        slots = cm.slot_mapping[:T]
        res.touch_slots(slots, page)
        # Sink and sliding-window pages of every request: read at every step.
        L = seq_lens.long()
        last = ((L - 1).clamp(min=0) // page)[:, None]
        cols = torch.cat([last - self._window_cols[None], self._sink_cols[None].expand(R, -1)], 1)
        valid = (cols >= 0) & (cols * page < L[:, None])
        res.touch(block_table.gather(1, cols.clamp(0, W - 1)), valid)
        if decode is not None and self._selection_cache is not None:  # whole searches fill their rows (metrics)
            res.count_cache_fills(decode.refresh & decode.coarse)
        # Key blocks the decode requests' cached masks selected (every HiP layer, one gather). Not with the
        # selection cache: decode reads them there, and promoting their pages would only cost PCIe bandwidth.
        if decode is not None and self._selection_cache is None:
            sel = self._mask_stack[:, decode.mask_row.long()].transpose(0, 1)  # [n, layers, Hkv, n_select]
            n = sel.shape[0]
            sel = sel.reshape(n, -1)
            cols = (sel.clamp(min=0).long() * cfg.block_size_k // page).clamp(max=W - 1)
            res.touch(block_table[decode.req.long()].gather(1, cols), sel >= 0)
        res.rebalance(self._offload.swap)
        self._phys_bt[:R, :W].copy_(res.translate_block_table(block_table))
        self._phys_slots[:T].copy_(res.translate_slots(slots, page))
        self._phys_slots[T:].fill_(-1)  # padded tokens of a captured batch write nothing
        self._offload_step += 1
        if self._offload_step % 64 == 0:  # counters copied without a sync; values of the previous copy
            LAST_STATS.update(self._offload.stats(self._fill_bytes))
            if self._offload_step % 1024 == 0:
                logger.info("HiP KV offload: %s", LAST_STATS)
        return dict(kv_block_table=self._phys_bt[:R, :W], kv_slot_mapping=self._phys_slots,
                    host_kv=self._offload.host_kv, selection_cache=self._selection_cache)

    def _dense_prefill(self, cm, qsl_cpu, q_lens, pf_reqs) -> DensePrefill | None:
        p0, p1 = int(pf_reqs[0]), int(pf_reqs[-1]) + 1
        if p1 - p0 != pf_reqs.numel():  # not one contiguous run (no reorder): the Triton path serves them all
            return None
        seq_host = compat.seq_lens_host(cm)[p0:p1]
        t0 = int(qsl_cpu[p0])
        below = self.cfg.prefill_dense_below
        return DensePrefill(
            token_start=t0,
            cu_seqlens_q=self._h2d(qsl_cpu[p0:p1 + 1] - t0),
            seqused_k=cm.seq_lens[p0:p1],
            block_table=cm.block_table_tensor[p0:p1],
            max_seqlen_q=int(q_lens[p0:p1].max()),
            max_seqlen_k=int(seq_host.max()),
            # Offloaded HiP layers have host pages FlashAttention cannot address.
            all_layers=bool(below) and int(seq_host.max()) <= below and not self.cfg.offload.enabled,
        )

    def _decode_rows_fa(self, cm, n: int, seqused_k: torch.Tensor, max_k: int | None = None) -> DensePrefill:
        """The step's ``n`` decode rows as one FlashAttention call (one query token per request), each reading
        ``seqused_k`` keys (0: none), at most ``max_k``. Persistent tensors, a static ``max_seqlen_k`` and a static
        split count (``fa_decode_splits`` of ``n``, which inside a graph is the captured size), so a captured decode
        graph replays it with this step's values. Default ``max_k``: the HiP layers' hand-over, whose rows are at
        most ``hip.dense_below_seq_len`` long: with the model's length (128K+) FlashAttention's own split choice made
        every HiP layer pay ~30 us on the H200 for a call with no rows at all."""
        if max_k is None:
            max_k = min(self._max_model_len, self.cfg.dense_below_seq_len)
        return DensePrefill(token_start=0, token_end=n, cu_seqlens_q=self._dec_cu[: n + 1], seqused_k=seqused_k,
                            block_table=cm.block_table_tensor[:n], max_seqlen_q=1, max_seqlen_k=max_k,
                            all_layers=False, num_splits=fa_decode_splits(n, self.num_kv_heads, self._num_sms))

    def _decode_blocks(self, cm, dec_reqs, seq_lens, block_table, rows_fa: bool) -> QueryBlocks:
        n = dec_reqs.numel()
        if n > self._dec["req"].shape[0]:
            raise RuntimeError(f"{n} decode requests exceed max_num_seqs={self._dec['req'].shape[0]}")
        pre = getattr(cm, "is_prefilling", None)
        if pre is not None and pre.device.type == "cpu":  # one host->device copy for both (no blocking copy)
            d32, prompt32 = self._h2d_rows(torch.stack([dec_reqs, pre[dec_reqs].to(dec_reqs.dtype)]))
        else:
            d32 = self._h2d(dec_reqs)
            prompt32 = None if pre is None else pre[d32.long()].to(torch.int32)
        b = self._dec
        to_fa = self._dense_rows_fa and rows_fa and self._hand_over_pays(n)
        # on CUDA one launch instead of ~100 small ops; rows past n (padding of a captured batch) stay inert
        self.decode_state.plan_into(block_table, seq_lens, d32, prompt32, cm.query_start_loc, b, self._dec_refresh,
                                    triton=ops.on_triton(seq_lens), dense_to_fa=to_fa, coarse_out=self._dec_coarse)
        dense_rows = self._decode_rows_fa(cm, n, b["fa_len"][:n]) if to_fa else None
        return QueryBlocks(
            req=b["req"][:n], start=b["start"][:n], length=b["length"][:n], pos0=b["pos0"][:n],
            window_start=b["window_start"][:n], dense_window_start=b["zeros"][:n],
            mask_row=b["row"][:n], refresh=self._dec_refresh[:n], dense_rows=dense_rows,
            coarse=None if self._dec_coarse is None else self._dec_coarse[:n],
        )

    def _hand_over_pays(self, n: int) -> bool:
        """Whether a step of ``n`` decode requests hands its short rows to FlashAttention: only when it replays
        (or would replay) a graph of more than ``HAND_OVER_MIN_ROWS`` - 1 rows. Decided on the graph's size, not on
        ``n``, so a batch padded into a larger graph decides as that graph's capture did."""
        return next((s for s in self._graph_sizes if s >= n), n) >= HAND_OVER_MIN_ROWS

    def _prefill_blocks(self, qsl_cpu, q_lens, reqs, seq_lens, seq_lens_host) -> QueryBlocks:
        cfg = self.cfg
        # Query blocks of the prefill requests: their count and layout are computed on the host.
        sub_qsl = torch.zeros(reqs.numel() + 1, dtype=torch.int64)
        sub_qsl[1:] = torch.cumsum(q_lens[reqs], 0)
        qb_req, qb_rel, qb_len, qb_pos0 = make_query_blocks(sub_qsl, seq_lens_host[reqs], cfg.block_size_q)
        req = reqs[qb_req.long()]
        start = qsl_cpu[req].long() + qb_rel.long() - sub_qsl[qb_req.long()]
        host = torch.stack([req, start, qb_len.long(), qb_pos0.long()])
        req_d, start_d, len_d, pos0_d = self._h2d_rows(host)
        ws = window_starts(pos0_d, cfg.sliding_window, cfg.block_size_k)
        if cfg.prefill_dense_below:
            ws = torch.where(seq_lens[req_d.long()] <= cfg.prefill_dense_below, torch.zeros_like(ws), ws)
        return QueryBlocks(
            req=req_d, start=start_d, length=len_d, pos0=pos0_d, window_start=ws,
            dense_window_start=torch.zeros_like(ws),
        )


def eager_decode_batches(full_sizes: list[int] | None, max_seqs: int) -> tuple[int, int] | None:
    """The range of decode batch sizes above the largest full-graph size (vLLM runs them PIECEWISE, attention
    eager), or None when full graphs cover every size up to ``max_seqs`` or decode has no full graphs at all."""
    if not full_sizes or full_sizes[-1] >= max_seqs:
        return None
    return full_sizes[-1] + 1, max_seqs


class HipAttentionImpl(AttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None, **unsupported):
        problems = []
        if alibi_slopes is not None:
            problems.append("ALiBi")
        if sliding_window is not None:
            problems.append(f"model sliding window ({sliding_window})")
        if logits_soft_cap:
            problems.append("logits soft-capping")
        if sinks is not None:
            problems.append("learned attention sinks")
        if attn_type != AttentionType.DECODER:
            problems.append(f"attention type {attn_type}")
        if kv_sharing_target_layer_name is not None:
            problems.append("cross-layer KV sharing")
        if kv_cache_dtype not in HipAttentionBackend.supported_kv_cache_dtypes:
            problems.append(f"kv_cache_dtype={kv_cache_dtype}")
        if head_size not in SUPPORTED_HEAD_SIZES:
            problems.append(f"head size {head_size} (supported: {SUPPORTED_HEAD_SIZES})")
        if problems:
            raise NotImplementedError(
                f"The HIP attention backend does not support {', '.join(problems)}. Choose another "
                f"--attention-backend for this model, or use attention_config.backend_per_kind to keep "
                f"these layers on their default backend."
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.cfg: HipConfig = hip_config_from_vllm(compat.get_current_vllm_config())
        self.layer_index: int | None = None
        self.dense: bool | None = None  # decided at the first forward, once the layer name is known

    def _resolve_layer(self, layer) -> None:
        self.layer_index = layer_index(getattr(layer, "layer_name", ""))
        self.dense = is_dense_layer(self.cfg, getattr(layer, "layer_name", ""))

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        k_cache, v_cache = compat.split_kv_cache(kv_cache, self.head_size)
        n = slot_mapping.shape[0]
        if self.cfg.offload.enabled:  # HiP layers write through the step's physical slots into two tiers
            md = compat.forward_attn_metadata(layer.layer_name)
            if md is not None and md.host_kv is not None and layer.layer_name in md.host_kv:
                hk, hv = compat.split_kv_cache(md.host_kv[layer.layer_name], self.head_size)
                ops.kv_write(key[:n], value[:n], k_cache, v_cache, md.kv_slot_mapping[:n],
                             host_k_cache=hk, host_v_cache=hv)
                return
        ops.kv_write(key[:n], value[:n], k_cache, v_cache, slot_mapping)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None,
                output_block_scale=None, **kwargs):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("HIP does not support fused output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        if self.dense is None:
            self._resolve_layer(layer)
        md: HipMetadata = attn_metadata
        cfg = self.cfg
        k_cache, v_cache = compat.split_kv_cache(kv_cache, self.head_size)
        T = md.num_actual_tokens
        q = query[:T].view(T, self.num_heads, self.head_size)
        out = output[:T].view(T, self.num_heads, self.head_size)
        common = dict(sink_tokens=cfg.sink_tokens, block_size_k=cfg.block_size_k, scale=self.scale, out=out)
        mask_kw = cfg.mask_kwargs
        block_table, tier = md.block_table, {}
        if md.host_kv is not None and layer.layer_name in md.host_kv:
            hk, hv = compat.split_kv_cache(md.host_kv[layer.layer_name], self.head_size)
            block_table, tier = md.kv_block_table, dict(host_k_cache=hk, host_v_cache=hv)
        common.update(tier)
        mask_kw["host_k_cache"] = tier.get("host_k_cache")
        for phase, qb in (("prefill", md.prefill), ("decode", md.decode)):
            if qb is None:
                continue
            args = (q, k_cache, v_cache, block_table, md.seq_lens, qb.req, qb.start, qb.length, qb.pos0)
            common["max_qb_len"] = cfg.block_size_q if qb.mask_row is None else 1
            dp = md.dense_prefill if phase == "prefill" else md.dense_decode
            if dp is not None and (self.dense or dp.all_layers):
                ops.flash_prefill(q, k_cache, v_cache, dp, scale=self.scale, out=out)
                selected = None
            elif self.dense:
                ops.attention(*args, qb.dense_window_start, md.no_indices,
                              indices_row=qb.dense_window_start, **common)  # every block reads row 0
                selected = None
            elif qb.mask_row is None:  # prefill: fresh masks for every query block
                idx = ops.mask(q, k_cache, block_table, qb.req, qb.start, qb.length, qb.window_start, **mask_kw)
                ops.attention(*args, qb.window_start, idx, **common)
                selected = idx
            else:  # decode: refresh the cached masks that are due, reuse the rest
                if qb.dense_rows is not None:  # rows at or below hip.dense_below_seq_len; the HiP kernels skip them
                    ops.flash_prefill(q, k_cache, v_cache, qb.dense_rows, scale=self.scale, out=out)
                    if cfg.record_stats:
                        fa_len = qb.dense_rows.seqused_k
                        stats.record(self.layer_index or 0, phase, (fa_len > 0).to(torch.int32), fa_len - 1,
                                     qb.dense_window_start, None, cfg.sink_tokens, cfg.block_size_k)
                cache = md.mask_caches[layer.layer_name]
                # staged refresh: most refreshes rerun only the exact stage, over groups kept per row
                staged = {} if qb.coarse is None else dict(groups=md.mask_groups[layer.layer_name], coarse=qb.coarse)
                sel_cache = {}
                if tier and md.selection_cache is not None:  # offload: selected K/V from the GPU, not the host
                    cand = md.selection_cache[layer.layer_name]
                    staged.update(cand=cand, v_cache=v_cache, host_v_cache=tier["host_v_cache"])
                    sel_cache = dict(cand=cand, exact_blocks=cfg.mask_exact_blocks)
                ops.mask(q, k_cache, block_table, qb.req, qb.start, qb.length, qb.window_start,
                         out=cache, out_row=qb.mask_row, active=qb.refresh, **mask_kw, **staged)
                ops.attention(*args, qb.window_start, cache, indices_row=qb.mask_row, **common, **sel_cache)
                selected = cache[qb.mask_row.long()] if cfg.record_stats else None  # a gather per layer: only for stats
            if cfg.record_stats:
                stats.record(self.layer_index or 0, phase, qb.length, qb.pos0,
                             qb.dense_window_start if selected is None else qb.window_start,
                             None if selected is None else (selected >= 0).sum(-1), cfg.sink_tokens,
                             cfg.block_size_k)
        return output
