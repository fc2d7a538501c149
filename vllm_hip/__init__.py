"""vllm-hip: HiP (Hierarchically Pruned) attention for stock vLLM, loaded as a general plugin.

``register()`` is the ``vllm.general_plugins`` entry point. It runs in every vLLM process (front end,
engine core, workers, Ray actors) and:

1. adds the ``HIP`` attention backend (``--attention-backend HIP``, ``LLM(attention_backend="HIP")``);
2. makes that enum member pickle by name, so spawned processes and Ray actors that unpickle a
   ``VllmConfig`` before loading plugins rebuild it (and register the backend) on the way;
3. on the CPU platform, which otherwise always picks CPU_ATTN, honours an explicit HIP selection;
4. validates ``additional_config["hip"]`` when vLLM builds its config (in the front end, so a bad value
   stops ``vllm serve`` in seconds, not after the engine has started);
5. routes the engine core's KV-cache planning through ``vllm_hip.kv_offload`` (a no-op unless
   ``hip.offload`` is set with the HIP backend).
"""
from __future__ import annotations

import os as _os

# Installed, `kernels/` is the subpackage vllm_hip.kernels (setup.py's package_dir). In a source checkout it
# sits beside this package: let the same import find it there, so the tree runs without installing.
_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(_os.path.join(_root, "kernels", "reference.py")):
    __path__.append(_root)  # noqa: F821  (package __path__)

BACKEND_NAME = "HIP"
BACKEND_PATH = "vllm_hip.backend.HipAttentionBackend"

__all__ = ["register", "BACKEND_NAME", "BACKEND_PATH"]
__version__ = "0.1.0"


def _rebuild_hip_member():
    """Unpickling target of ``AttentionBackendEnum.HIP``: registers the backend first if needed."""
    register()
    from vllm_hip.compat import AttentionBackendEnum

    return AttentionBackendEnum[BACKEND_NAME]


def _reduce_hip_member(protocol=None):
    return (_rebuild_hip_member, ())


def register() -> None:
    """Idempotent plugin entry point."""
    from vllm_hip import compat

    member = compat.add_backend_member(BACKEND_NAME, BACKEND_PATH)
    # Enum members pickle as ``AttentionBackendEnum(value)``, which fails in a process that has not
    # registered HIP yet; an instance attribute takes precedence over the class's __reduce_ex__.
    if member.__dict__.get("__reduce_ex__") is not _reduce_hip_member:
        member.__reduce_ex__ = _reduce_hip_member
    _patch_cpu_platform()
    _validate_hip_config_with_platform()
    from vllm_hip.kv_offload import plan_and_shrink

    compat.wrap_kv_cache_planning(plan_and_shrink)


def _validate_hip_config_with_platform() -> None:
    """Parse ``additional_config["hip"]`` where vLLM finalises every config (``check_and_update_config``)."""
    from vllm_hip import compat

    cls = type(compat.current_platform())
    current = getattr(cls, "check_and_update_config", None)
    if current is None or getattr(current.__func__, "_hip_wrapped", False):
        return
    original = current.__func__

    def check_and_update_config(cls, vllm_config):
        original(cls, vllm_config)
        if (getattr(vllm_config, "additional_config", None) or {}).get("hip") is not None:
            from vllm_hip.config import hip_config_from_vllm

            hip_config_from_vllm(vllm_config)

    check_and_update_config._hip_wrapped = True
    cls.check_and_update_config = classmethod(check_and_update_config)


def _patch_cpu_platform() -> None:
    """On CPU, route an explicit HIP selection to our backend (CpuPlatform ignores selections)."""
    from vllm_hip import compat

    try:
        cpu_cls = compat.cpu_platform_class()
    except Exception:  # CPU platform module not importable on this build
        return
    current = cpu_cls.__dict__.get("get_attn_backend_cls")
    if current is None or getattr(current.__func__, "_hip_wrapped", False):
        return
    original = current.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is not None and getattr(selected_backend, "name", None) == BACKEND_NAME:
            from vllm_hip.backend import HipAttentionBackend

            HipAttentionBackend.check_selector_config(attn_selector_config)
            return selected_backend.get_path()
        return original(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._hip_wrapped = True
    cpu_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
