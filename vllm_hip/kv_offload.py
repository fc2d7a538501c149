"""HiP KV offload: a KV pool larger than GPU memory, with cold pages in pinned host memory.

How it fits into vLLM without touching its scheduler:

* Planning (engine core, ``plan_offload``): vLLM's block pool gets ``N = G + H`` blocks, where ``H`` pages of
  every HiP layer fit in ``hip.offload.host_gib`` of host memory and ``G`` pages per HiP layer stay in GPU
  memory (``hip.offload.gpu_blocks``, or all the GPU memory vLLM found for the KV cache). Dense layers
  (``hip.dense_layers``) read every key at every step, so they keep all ``N`` pages on the GPU. vLLM then admits,
  schedules, preempts and frees requests against ``N`` blocks exactly as usual.
* Allocation: the per-layer KV tensors vLLM allocates for HiP layers are shrunk to ``G`` pages
  (``shrink_kv_cache_configs``); the other ``H`` pages of each HiP layer are a pinned host tensor mapped into the
  GPU's address space (``HostTiers``), which the Triton kernels read and write directly.
* Residency (``vllm_hip.kv_residency.KVResidency``, one per step in the metadata builder): a logical -> physical
  page permutation; the pages a step uses are marked, the most recently used host pages are swapped with the
  least recently used GPU pages, and the block table / slot mapping handed to the HiP kernels are translated.
  The permutation makes block accounting trivial: every logical page is stored exactly once, vLLM's frees and
  preemptions need no hook, and nothing can leak or be freed twice.
* Selection cache (``hip.offload.selection_cache_gib``; ``selection_cache_rows`` decides, ``alloc_selection_cache``
  allocates): per decode slot and HiP layer, the keys and values of the candidates the last whole search handed
  to the exact stage, on the GPU, so decode steps between whole searches read no host memory. Its bytes come out
  of the plan's GPU budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_hip import compat
from vllm_hip.config import HipConfig, HipConfigError
from vllm_hip.kv_residency import KVResidency

LAST_STATS: dict = {}  # the latest offload statistics of this process (hit rate, bytes moved), for benchmarks

logger = compat.init_logger(__name__)


@dataclass(frozen=True)
class OffloadPlan:
    page_bytes: int  # one page (vLLM block) of one layer
    hip_layers: tuple[str, ...]
    dense_layers: tuple[str, ...]
    device_pages: int  # G: pages of each HiP layer in GPU memory
    host_pages: int  # H: pages of each HiP layer in host memory
    selection_cache_bytes: int = 0  # hip.offload.selection_cache_gib: all HiP layers and mask rows (0: not used)

    @property
    def num_pages(self) -> int:
        return self.device_pages + self.host_pages

    def gpu_bytes(self) -> int:
        return self.page_bytes * (len(self.dense_layers) * self.num_pages + len(self.hip_layers) * self.device_pages) \
            + self.selection_cache_bytes

    def host_bytes(self) -> int:
        return self.page_bytes * len(self.hip_layers) * self.host_pages


# ------------------------------------------------------------------------------------------ selection cache
def selection_cache_tokens(cfg: HipConfig) -> int:
    """Rows of one (mask row, KV head) of the selection cache: the tokens of the exact stage's candidates."""
    return cfg.n_select * cfg.mask_exact_blocks * cfg.block_size_k


def selection_cache_row_bytes(cfg: HipConfig, num_kv_heads: int, head_size: int, element_size: int,
                              num_hip_layers: int) -> int:
    """GPU bytes of one selection-cache row (one decode slot) over all HiP layers, keys and values."""
    return num_hip_layers * num_kv_heads * selection_cache_tokens(cfg) * 2 * head_size * element_size


def selection_cache_rows(cfg: HipConfig, max_num_seqs: int, num_kv_heads: int, head_size: int, element_size: int,
                         num_hip_layers: int) -> tuple[int, str | None]:
    """Whether offload keeps a selection cache: ``(rows, None)`` with one row per mask row (the decode slots plus
    the trash row), or ``(0, why not)``. Decided from the configuration and the model alone, so the engine's plan
    and every worker's metadata builder decide the same."""
    if not cfg.offload.enabled:
        return 0, "KV offload is off"
    if not cfg.mask_coarse_interval:
        return 0, "it needs the staged refresh (hip.mask_coarse_interval > 0 with hip.mask_exact_blocks > 1)"
    budget = cfg.offload.selection_cache_gib
    if budget <= 0:
        return 0, "hip.offload.selection_cache_gib is 0"
    rows = mask_rows(cfg, max_num_seqs)
    per_row = selection_cache_row_bytes(cfg, num_kv_heads, head_size, element_size, num_hip_layers)
    if rows * per_row > budget * 2**30:
        fit = int(budget * 2**30 // per_row) - 1
        return 0, (f"one row per decode slot needs {rows * per_row / 2**30:.1f} GiB for {rows - 1} slots "
                   f"(max_num_seqs or hip.mask_cache_slots), more than hip.offload.selection_cache_gib={budget:g}; "
                   f"lower --max-num-seqs to {max(fit, 0)} or raise hip.offload.selection_cache_gib")
    return rows, None


def alloc_selection_cache(cfg: HipConfig, rows: int, num_kv_heads: int, head_size: int, dtype, device, pick_like):
    """One HiP layer's selection cache ``(keys, values, pick)`` as ``triton_hip.hip_mask(cand=...)`` takes it:
    ``[rows, Hkv, selection_cache_tokens, head_size]`` each, and ``pick`` like the layer's mask cache
    ``pick_like``. Left unset: a row is read only after a whole search filled it."""
    shape = (rows, num_kv_heads, selection_cache_tokens(cfg), head_size)
    return (torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device),
            torch.full_like(pick_like, -1))


def mask_rows(cfg: HipConfig, max_num_seqs: int) -> int:
    """Rows of each layer's decode mask cache that a selection cache backs: the slots plus the trash row
    (``mask_state.DecodeMaskState.cache_rows``)."""
    return (cfg.mask_cache_slots or max_num_seqs) + 1


def host_pages_for(cfg: HipConfig, page_bytes: int, num_hip_layers: int) -> int:
    """Host pages per HiP layer that ``hip.offload.host_gib`` holds (the same number on every process)."""
    return int(cfg.offload.host_gib * 2**30) // (page_bytes * max(1, num_hip_layers))


def layer_index(layer_name: str) -> int | None:
    try:
        return compat.extract_layer_index(layer_name)
    except Exception:  # a name without a layer number: never dense by index
        return None


def is_dense_layer(cfg: HipConfig, layer_name: str) -> bool:
    """Whether ``layer_name`` is one of ``hip.dense_layers`` (the backend and the offload plan ask the same)."""
    return layer_index(layer_name) in cfg.dense_layers


def plan_offload(cfg: HipConfig, layer_specs: dict, available_bytes: int, max_num_seqs: int = 1) -> OffloadPlan:
    """Split of the KV pool between GPU and host memory; raises ``HipConfigError`` naming the fix. The selection
    cache (``hip.offload.selection_cache_gib``, for ``max_num_seqs`` decoding requests) comes out of the GPU budget."""
    pages = {getattr(s, "page_size_bytes", None) for s in layer_specs.values()}
    if len(pages) != 1 or None in pages:
        raise HipConfigError("hip.offload supports models whose attention layers all have one KV page size "
                             f"(found {sorted(p for p in pages if p)}); remove hip.offload for this model")
    page_bytes = pages.pop()
    names = sorted(layer_specs)
    dense = tuple(n for n in names if is_dense_layer(cfg, n))
    hip = tuple(n for n in names if n not in dense)
    if not hip:
        raise HipConfigError("hip.offload needs at least one HiP (non-dense) layer; check hip.dense_layers")
    H = host_pages_for(cfg, page_bytes, len(hip))
    if H <= 0:
        raise HipConfigError(f"hip.offload.host_gib={cfg.offload.host_gib} holds no KV page "
                             f"({page_bytes * len(hip)} bytes per page over {len(hip)} HiP layers); raise it")
    spec = layer_specs[hip[0]]
    heads, hs = getattr(spec, "num_kv_heads", 0), getattr(spec, "head_size", 0)
    elt = getattr(getattr(spec, "dtype", None), "itemsize", 2)
    rows, why_not = selection_cache_rows(cfg, max_num_seqs, heads, hs, elt, len(hip))
    if why_not and cfg.offload.selection_cache_gib > 0:
        logger.warning("HiP KV offload runs without the selection cache (decode then reads selected blocks from "
                       "host memory, much slower): %s", why_not)
    sel = rows * selection_cache_row_bytes(cfg, heads, hs, elt, len(hip))
    avail_pages = (available_bytes - sel) // page_bytes
    if cfg.offload.gpu_blocks:
        G = cfg.offload.gpu_blocks
    else:  # all the GPU KV memory vLLM found: dense layers hold N = G + H pages, HiP layers G
        G = (avail_pages - len(dense) * H) // (len(dense) + len(hip))
    plan = OffloadPlan(page_bytes, hip, dense, G, H, sel)
    if G <= 0 or plan.gpu_bytes() > available_bytes:
        raise HipConfigError(
            f"hip.offload does not fit in the GPU KV memory vLLM found ({available_bytes / 2**30:.2f} GiB): "
            f"{len(dense)} dense layers keep all {G + H} pages on the GPU and {len(hip)} HiP layers {G} pages, "
            f"plus {sel / 2**30:.2f} GiB of selection cache: {plan.gpu_bytes() / 2**30:.2f} GiB. Lower "
            f"hip.offload.gpu_blocks or hip.offload.host_gib, use fewer hip.dense_layers, lower max_num_seqs or "
            f"hip.offload.selection_cache_gib (the selection cache), or raise --gpu-memory-utilization")
    return plan


def shrink_kv_cache_configs(configs, plan: OffloadPlan) -> None:
    """Make vLLM allocate ``G`` pages (not ``N``) of GPU memory for each HiP layer's KV tensor."""
    hip = set(plan.hip_layers)
    for kv_cfg in configs:
        for t in kv_cfg.kv_cache_tensors:
            if not hip.intersection(t.shared_by):
                continue
            if len(t.shared_by) != 1 or getattr(t, "block_stride", 0) or getattr(t, "offset", 0):
                raise HipConfigError("hip.offload needs one KV tensor per layer; this vLLM packs several layers "
                                     "into one allocation, which offload does not support yet. Remove hip.offload")
            t.size = plan.device_pages * plan.page_bytes


def plan_and_shrink(original, vllm_config, kv_cache_specs, available_memory):
    """Wrapper of vLLM's ``get_kv_cache_configs`` (installed by ``register()``): offload planning."""
    from vllm_hip.config import hip_config_from_vllm

    cfg = hip_config_from_vllm(vllm_config)
    if not cfg.offload.enabled or not compat.selects_backend(vllm_config, "HIP"):
        return original(vllm_config, kv_cache_specs, available_memory)
    if not compat.kv_tensors_per_layer():
        raise HipConfigError("hip.offload needs vLLM's per-layer KV tensors (vLLM 0.26 on CUDA); this vLLM backs all "
                             "layers with one allocation, which offload does not support yet. Remove hip.offload")
    plan = plan_offload(cfg, kv_cache_specs[0], min(available_memory), vllm_config.scheduler_config.max_num_seqs)
    vllm_config.cache_config.num_gpu_blocks_override = plan.num_pages
    configs = original(vllm_config, kv_cache_specs, available_memory)
    shrink_kv_cache_configs(configs, plan)
    block = vllm_config.cache_config.block_size
    logger.info(
        "HiP KV offload: pool of %d blocks (%d tokens); %d dense layers keep them all on the GPU, %d HiP layers "
        "keep %d on the GPU and %d in pinned host memory (%.1f GiB GPU KV, of which %.1f GiB selection cache; "
        "%.1f GiB host KV)",
        plan.num_pages, plan.num_pages * block, len(plan.dense_layers), len(plan.hip_layers), plan.device_pages,
        plan.host_pages, plan.gpu_bytes() / 2**30, plan.selection_cache_bytes / 2**30, plan.host_bytes() / 2**30)
    return configs


class HostTiers:
    """The host tier of every HiP layer of one KV-cache group, plus the residency that maps pages onto tiers.

    Built by the metadata builder at its first step, after vLLM allocated the (shrunk) device tensors.
    """

    def __init__(self, cfg: HipConfig, layer_kv: dict[str, torch.Tensor], page_size: int, device,
                 write_moves: int = 0):
        first = next(iter(layer_kv.values()))
        G = first.shape[0]  # [pages, Hkv, page, 2*hs] logical view of [pages, page, Hkv, 2*hs] storage
        page_bytes = first[0].numel() * first.element_size()
        H = host_pages_for(cfg, page_bytes, len(layer_kv))
        self.page_size = page_size
        self.page_bytes = page_bytes
        self.host_kv: dict[str, torch.Tensor] = {}
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._host_storage: list[torch.Tensor] = []  # the pinned CPU tensors behind the device views
        pin = torch.device(device).type == "cuda"
        for name, kv in layer_kv.items():
            storage = kv.transpose(1, 2)  # [G, page, Hkv, 2*hs], contiguous
            if not storage.is_contiguous() or kv.shape[0] != G:
                raise RuntimeError(f"unexpected KV cache layout for {name}: shape {tuple(kv.shape)}, "
                                   f"strides {kv.stride()}")
            if pin:
                self._host_storage.append(compat.pinned_host_empty((H, *storage.shape[1:]), kv.dtype))
                host = compat.device_view_of_host(self._host_storage[-1])
            else:
                host = torch.empty((H, *storage.shape[1:]), dtype=kv.dtype)
            self.host_kv[name] = host.transpose(1, 2)  # same logical view as the device tier
            self.pairs.append((storage.view(G, -1), host.view(H, -1)))
        # write_moves: the most pages one step writes, so a prefill chunk lands on the GPU
        self.residency = KVResidency(G + H, G, device, cfg.offload.max_moves, max_write_moves=write_moves)
        # One launch for all layers, moving only the pages that change tier (CUDA); the torch loop on CPU.
        if pin:
            from vllm_hip.kernels.page_swap import PageSwapper  # triton: only where a GPU tier exists

            self.swap = PageSwapper(self.pairs, device)
        else:
            self.swap = self.pairs
        logger.info("HiP KV offload: %d layers x %d host pages (%.1f GiB pinned), %d GPU pages, %d moves/step",
                    len(layer_kv), H, H * page_bytes * len(layer_kv) / 2**30, G, cfg.offload.max_moves)

    def stats(self, bytes_per_fill: int = 0) -> dict:
        """Offload counters (``KVResidency.stats_async``); ``bytes_per_fill``: one selection-cache row, all layers."""
        return self.residency.stats_async(self.page_bytes * len(self.pairs), bytes_per_fill)
