"""Passkey demo: SmolLM2-135M in vLLM with HiP attention vs the dense default backend, same prompt, greedy.

    .venv/bin/python benchmarks/demo.py                      # ~4K tokens, needle at 50 %, dense + HiP
    .venv/bin/python benchmarks/demo.py --depths 0.1,0.3,0.5,0.7,0.9 --backends dense
    .venv/bin/python benchmarks/demo.py --hip '{"k": 256, "sliding_window": 128}'

Prints each backend's answer, whether it is right, timings, and the fraction of keys HiP attended
(from ``vllm_hip.stats.attended_fraction`` when the plugin provides it, else computed from the config and
labelled "analytic"). Runs on whatever platform vLLM detects; the CPU-only settings apply only on CPU.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import assets  # noqa: E402

DEFAULT_HIP = {}  # HipConfig defaults


def _on_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _setup_env(on_cpu: bool) -> None:
    """Environment for vLLM; must run before ``import vllm``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if on_cpu:
        # See eval-assets.md: in-process engine (fast start) and a KV space that skips the memory check.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _mem_gib() -> tuple[float, float]:
    """(this process's peak RSS, machine MemTotal - MemAvailable) in GiB."""
    rss = used = 0.0
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 2**20
        info = {ln.split(":")[0]: int(ln.split()[1]) for ln in open("/proc/meminfo")}
        used = (info["MemTotal"] - info["MemAvailable"]) / 2**20
    except OSError:
        pass
    return rss, used


def hip_available() -> str | None:
    """How the HIP backend can be loaded: 'plugin' (installed entry point), 'repo' (importable from the
    checkout; registered by hand), or None."""
    from importlib.metadata import entry_points

    if any(ep.value.startswith("vllm_hip") for ep in entry_points(group="vllm.general_plugins")):
        return "plugin"
    if (REPO / "vllm_hip" / "__init__.py").is_file():
        return "repo"
    return None


def _load_repo_plugin() -> None:
    """Make the checkout's vllm_hip importable here and in any spawned vLLM process, then register it."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    import vllm_hip

    vllm_hip.register()


def analytic_fraction(hip: dict, num_layers: int, ctx_len: int) -> dict:
    """Fraction of causal (query, key) pairs attended, averaged over layers: dense layers 1.0, HiP layers
    min(1, (sink + window + k) / context). 'decode' is for one query after ``ctx_len`` tokens, 'prefill' for
    all queries of a ``ctx_len``-token prompt."""
    try:
        from vllm_hip.config import HipConfig

        cfg = HipConfig.from_dict(hip).to_dict()
    except Exception:
        cfg = dict(DEFAULT_HIP, dense_below_seq_len=0)
        cfg.update(hip)
    budget = cfg["sink_tokens"] + cfg["sliding_window"] + cfg["k"]
    n_dense = sum(1 for i in set(cfg["dense_layers"]) if 0 <= i < num_layers)
    dense_all = ctx_len <= cfg.get("dense_below_seq_len", 0)
    hip_decode = 1.0 if dense_all else min(1.0, budget / ctx_len)
    causal = ctx_len * (ctx_len + 1) / 2
    hip_prefill = 1.0 if dense_all else sum(min(p + 1, budget) for p in range(ctx_len)) / causal
    avg = lambda f: (n_dense + (num_layers - n_dense) * f) / num_layers  # noqa: E731
    return {"decode": avg(hip_decode), "prefill": avg(hip_prefill), "hip_layer_decode": hip_decode,
            "budget_tokens": budget, "source": "analytic"}


def _hip_has_field(name: str) -> bool:
    try:
        from dataclasses import fields

        from vllm_hip.config import HipConfig

        return any(f.name == name for f in fields(HipConfig))
    except Exception:
        return False


def measured_fraction():
    """``vllm_hip.stats.attended_fraction()`` (counts recorded in this process), or None."""
    try:
        from vllm_hip import stats

        val = stats.attended_fraction()
    except Exception as e:  # the stats API is the plugin's; never let it break the demo
        print(f"[demo] vllm_hip.stats.attended_fraction unavailable ({e!r}); using the analytic value",
              file=sys.stderr)
        return None
    if not isinstance(val, dict) or val.get("overall") is None:
        return None  # nothing recorded (stats off, or the engine ran in another process)
    return {k: v for k, v in val.items() if k != "per_layer"} | {"source": "measured"}


def run_backend(backend: str, model: str, prompts: list[str], a, on_cpu: bool) -> dict:
    """Build one LLM, generate greedily for all prompts, tear it down. Returns answers and timings."""
    from vllm import LLM, SamplingParams

    kw = dict(model=model, max_model_len=a.max_model_len, enforce_eager=True, dtype=a.dtype, seed=0)
    if not on_cpu:
        kw["gpu_memory_utilization"] = a.gpu_memory_utilization
    if backend == "hip":
        hip = dict(a.hip)
        if _hip_has_field("record_stats"):
            hip.setdefault("record_stats", True)
            try:
                from vllm_hip import stats

                stats.reset()
            except Exception:
                pass
        kw["attention_backend"] = "HIP"
        kw["additional_config"] = {"hip": hip}
    t0 = time.time()
    llm = LLM(**kw)
    t_start = time.time() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens)
    t0 = time.time()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    t_gen = time.time() - t0
    res = {"backend": backend, "answers": [o.outputs[0].text for o in outs],
           "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
           "startup_s": t_start, "generate_s": t_gen}
    if backend == "hip":
        res["fraction"] = measured_fraction()
    # Tear down before the next engine is built in this process.
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm, outs
    gc.collect()
    res["peak_rss_gib"], res["mem_used_gib"] = _mem_gib()
    return res


def _run_isolated(backend: str, a) -> dict:
    """Run one backend in a fresh interpreter (``--isolate``); results come back as JSON on stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", backend] + a._argv
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000, help="prompt length in tokens")
    ap.add_argument("--depths", default="0.5", help="needle depths in 0..1, comma separated")
    ap.add_argument("--seed", type=int, default=0, help="seed of the passkeys")
    ap.add_argument("--offset", type=int, default=0, help="haystack tokens to skip")
    ap.add_argument("--plain", action="store_true", help="no chat template")
    ap.add_argument("--backends", default="dense,hip", help="dense and/or hip")
    ap.add_argument("--hip", type=json.loads, default=DEFAULT_HIP, help="additional_config['hip'] as JSON")
    ap.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on CPU, auto elsewhere)")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-tokens", type=int, default=8, help="new tokens per answer")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--isolate", action="store_true", help="one subprocess per backend")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a._argv = [x for x in (sys.argv[1:] if argv is None else argv) if x != "--isolate"]
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    on_cpu = not _on_cuda()
    _setup_env(on_cpu)
    if a.dtype is None:
        a.dtype = "bfloat16" if on_cpu else "auto"

    t0 = time.time()
    model = str(assets.smollm2_dir(a.cache_dir))
    haystack = assets.haystack_text(a.cache_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    depths = [float(d) for d in a.depths.split(",")]
    rng = random.Random(a.seed)
    keys = [rng.randint(10000, 99999) for _ in depths]
    prompts = [assets.passkey_prompt(tok, a.tokens, d, key, haystack, chat=not a.plain, offset=a.offset)[0]
               for d, key in zip(depths, keys)]
    t_assets = time.time() - t0

    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if "hip" in backends:
        how = hip_available()
        if how is None:
            print("[demo] vllm_hip is not available: running the dense baseline only", file=sys.stderr)
            backends.remove("hip")
        elif how == "repo":
            _load_repo_plugin()

    if a._child:  # --isolate worker: one backend, JSON on stdout
        print(json.dumps(run_backend(a._child, model, prompts, a, on_cpu)))
        return 0

    results = {}
    for b in backends:
        if a.isolate:
            results[b] = _run_isolated(b, a)
        else:
            results[b] = run_backend(b, model, prompts, a, on_cpu)
        r = results[b]
        oks = "".join("+" if assets.answer_ok(t, k) else "-" for t, k in zip(r["answers"], keys))
        print(f"[demo] {b}: {oks} in {r['startup_s']:.1f} + {r['generate_s']:.1f} s", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------ report
    print()
    print(f"model {model} (dtype {a.dtype}), platform {'cpu' if on_cpu else 'cuda'}, "
          f"assets {t_assets:.1f} s, chat template {'off' if a.plain else 'on'}")
    print(f"prompt: ~{a.tokens} tokens of Britannica 1911 with the needle '{assets.NEEDLE.format(key='NNNNN')}'")
    head = f"{'depth':>6} {'passkey':>8} " + " ".join(f"{b + ' answer':<24}" for b in results)
    print(head)
    for i, (d, key) in enumerate(zip(depths, keys)):
        cells = []
        for b, r in results.items():
            ans = r["answers"][i].strip().replace("\n", " ")
            cells.append(f"{('OK ' if assets.answer_ok(ans, key) else 'XX ') + repr(ans)[:21]:<24}")
        print(f"{d:>6.2f} {key:>8} " + " ".join(cells))
    for b, r in results.items():
        acc = sum(assets.answer_ok(t, k) for t, k in zip(r["answers"], keys)) / len(keys)
        r["accuracy"] = acc
        print(f"{b:>6}: accuracy {acc:.0%}, prompt tokens {min(r['prompt_tokens'])}-{max(r['prompt_tokens'])}, "
              f"startup {r['startup_s']:.1f} s, generate {r['generate_s']:.1f} s "
              f"({r['generate_s'] / len(prompts):.1f} s/prompt), peak RSS {r['peak_rss_gib']:.1f} GiB, "
              f"machine mem used {r['mem_used_gib']:.1f} GiB")
    if "hip" in results:
        r = results["hip"]
        ctx = max(r["prompt_tokens"])
        from transformers import AutoConfig

        n_layers = AutoConfig.from_pretrained(model).num_hidden_layers
        frac = r.get("fraction")
        ana = analytic_fraction(a.hip, n_layers, ctx)
        if frac:
            show = ", ".join(f"{k} {v:.3f}" for k, v in frac.items() if isinstance(v, float))
            print(f"HiP attended fraction of causal keys (measured by vllm_hip.stats, all layers): {show}")
        print(f"HiP attended fraction of keys (analytic, {n_layers} layers, {ctx} tokens, hip {json.dumps(a.hip)}): "
              f"decode {ana['decode']:.3f} (HiP layers {ana['hip_layer_decode']:.3f}), "
              f"prefill {ana['prefill']:.3f}")
        r["analytic_fraction"] = ana
    if a.json:
        Path(a.json).write_text(json.dumps({"depths": depths, "keys": keys, "results": results}, indent=1,
                                           default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
