"""A CPU stand-in for vLLM's jit_monitor: records, for every Triton kernel launch of vllm-hip, the key Triton
compiles kernels by, so a test can tell which launches after start-up would compile a new kernel on a GPU.

The key follows Triton's rules (runtime/jit.py): constexpr values and launch options (num_warps, num_stages) by
value; tensors by dtype and whether the pointer is 16-byte aligned; ints by width (32/64 bit), == 1 and divisible
by 16; arguments in ``do_not_specialize`` by type only. On the H200 the real monitor caught both kinds of miss this
models: batch-dependent ints and metadata rows at unaligned offsets.
"""
import importlib
import inspect

import torch

MODULES = ("vllm_hip.kernels.triton_hip", "vllm_hip.kernels.decode_plan", "vllm_hip.kernels.page_swap")


def arg_key(v, specialize: bool, annotation: str = ""):
    if isinstance(v, torch.Tensor):
        return ("ptr", str(v.dtype), v.data_ptr() % 16 == 0 if specialize else None)
    if isinstance(v, bool):
        return ("bool", v if specialize else None)
    if isinstance(v, int):
        # a tl.int64 annotation types the argument whatever its value, as Triton does
        wide = annotation in ("int64", "tl.int64") or not -(2 ** 31) <= v < 2 ** 31
        return ("int", wide, v == 1, v % 16 == 0) if specialize else ("int", wide)
    if isinstance(v, float):
        return ("float",)
    return (type(v).__name__,)


def not_specialized(kernel) -> set:
    """Names of the kernel's arguments in ``do_not_specialize``."""
    if hasattr(kernel, "params"):  # compiled JITFunction
        return {p.name for p in kernel.params if p.do_not_specialize}
    return set(kernel.kwargs.get("do_not_specialize") or [])  # the interpreter's stand-in keeps the decorator's


class Recorder:
    """Stands in for one kernel: ``kernel[grid](*args)`` records the launch's key, then launches."""

    def __init__(self, name: str, kernel, log: list):
        self.name, self.kernel, self.log = name, kernel, log
        params = inspect.signature(kernel.fn).parameters
        self.names = list(params)
        self.const = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        self.free = not_specialized(kernel)
        self.annotation = {n: str(p.annotation) for n, p in params.items()}

    def key(self, args, kw) -> tuple:
        bound = dict(zip(self.names, args), **kw)
        parts = []
        for n, v in bound.items():
            if n in self.const or n not in self.names:  # constexpr or launch option
                parts.append((n, "value", repr(v)))
            else:
                parts.append((n, *arg_key(v, n not in self.free, self.annotation[n])))
        return tuple(parts)

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.log.append((self.name, self.key(args, kw)))
            return launch(*args, **kw)

        return run


def install(log: list, set_attr=setattr) -> None:
    """Replaces every host-launched kernel (``*_kernel``, ``*_kernel_tiered``) of our kernel modules; in a test
    process pass ``monkeypatch.setattr`` so they are restored afterwards."""
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in list(vars(mod).items()):
            if (name.endswith("_kernel") or name.endswith("_kernel_tiered")) and hasattr(obj, "fn"):
                set_attr(mod, name, Recorder(name, obj, log))


def new_variants(log: list, start: int) -> list[str]:
    """Launches from ``log[start:]`` whose key no launch before ``start`` had: each would compile on a GPU."""
    seen = set(log[:start])
    out = []
    for name, key in log[start:]:
        if (name, key) not in seen:
            seen.add((name, key))
            before = [k for n, k in log[:start] if n == name]
            diff = sorted({p for p in key} - set().union(*before)) if before else "never launched at start-up"
            out.append(f"{name}: {diff}")
    return out
