"""End-to-end vLLM throughput: FLASH_ATTN vs HIP on a Llama-3.1-8B-shaped model with dummy weights.

    python benchmarks/bench_throughput.py --lengths 8192,32768,131072 --output-len 256 --log $OUT/tp.jsonl

Each (backend) runs in its own process (one engine, all workloads). Per prompt length it measures, with
prefix caching off and random token prompts:
* time to first token of one request alone, and the mean over N requests sent together;
* decode throughput at concurrency 1 and at N = the most requests whose KV fits the engine's KV pool: the
  engine is stepped directly, and the rate counts the tokens produced after every request has its first token
  over the time after that moment (so prefill is paid once, not subtracted);
and prints one table with the GPU named. Weights are random (``load_format="dummy"``): speed only.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-5, "vocab_size": 128256,
    "max_position_embeddings": 1048576, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}


SMOKE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, vocab_size=4096, rope_scaling=None, torch_dtype="float32")



def _pct(xs, p):
    """p-th percentile of step times ``xs`` (seconds) in ms, nearest rank; None for no steps."""
    return round(1e3 * sorted(xs)[min(len(xs) - 1, len(xs) * p // 100)], 2) if xs else None

class GcClock:
    """Time the interpreter spends in garbage collection (``gc.callbacks``), by generation: a full collection
    walks every list of token ids the engine holds, so long prompts make it a per-step cost worth seeing."""

    def __init__(self):
        self.total, self.full, self._t0 = 0.0, 0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.total += time.perf_counter() - self._t0
            self.full += info["generation"] == 2
            self._t0 = None


def write_model_dir(path: Path, tokenizer_dir: Path, max_len: int, smoke: bool = False) -> Path:
    """config.json of Llama-3.1-8B shapes (``smoke``: a tiny Llama, to check the script on CPU) plus a small
    local tokenizer (prompts are token ids anyway)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(LLAMA_8B, max_position_embeddings=max(max_len, 131072), **(SMOKE if smoke else {}))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (path / f.name).write_bytes(f.read_bytes())
    return path


PAGE_TOKENS = 16
PAGE_BYTES = PAGE_TOKENS * LLAMA_8B["num_key_value_heads"] * LLAMA_8B["head_dim"] * 2 * 2  # K+V, bf16, one layer


def offload_config(a) -> dict:
    """hip.offload for HIP_OFFLOAD: with ``--offload-cap c``, the GPU holds c x the KV ``--offload-reqs`` requests
    of the longest prompt need, the rest (plus 2 %) in host memory; else ``--offload`` as given. The selection
    cache (``max_seqs + 1`` mask rows of k x ``mask_exact_blocks`` tokens' K and V per HiP layer, where
    ``kv_offload.selection_cache_rows`` uses it, as the engine will) counts against the cap: GPU pages = the cap
    minus its size in pages."""
    off = json.loads(a.offload)
    if a.offload_cap:
        hip = json.loads(a.hip)
        hip_layers = LLAMA_8B["num_hidden_layers"] - len(hip.get("dense_layers", [0, 1, 2]))
        need = a.offload_reqs * -(-(max(a.lengths) + a.output_len) // PAGE_TOKENS)
        cap = int(a.offload_cap * need + 0.5)
        from vllm_hip.config import HipConfig
        from vllm_hip.kv_offload import selection_cache_row_bytes, selection_cache_rows

        cfg = HipConfig.from_dict(dict(hip, offload=dict(off, host_gib=off.get("host_gib") or 1.0)))
        shape = (LLAMA_8B["num_key_value_heads"], LLAMA_8B["head_dim"], 2, hip_layers)  # bf16
        rows, _ = selection_cache_rows(cfg, a.max_seqs, *shape)  # 0 where the engine runs without it
        sel_pages = -(-rows * selection_cache_row_bytes(cfg, *shape) // (PAGE_BYTES * hip_layers))  # per layer
        gpu = cap - sel_pages
        if gpu <= 0:
            raise SystemExit(f"--offload-cap {a.offload_cap}: {cap} pages per layer do not hold the selection cache "
                             f"of {a.max_seqs} requests ({sel_pages} pages per layer)")
        off["gpu_blocks"] = gpu
        off["host_gib"] = round((need - gpu) * 1.02 * PAGE_BYTES * hip_layers / 2**30, 2)
    return off


def worker(a) -> None:
    """One backend, all workloads, in this process; prints one JSON line per measurement."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: its memory is ours
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max(a.lengths) + a.output_len + 16
    kw = dict(model=a.model_dir, load_format="dummy", max_model_len=max_len, enable_prefix_caching=False,
              gpu_memory_utilization=a.gpu_mem, max_num_seqs=a.max_seqs, seed=0,
              max_num_batched_tokens=a.batched_tokens, enforce_eager=a.eager)
    if not a.eager:
        # vLLM's default sizes [1, 2, 4, 8, 16, ...] give full decode graphs only up to max_num_seqs, so with
        # --max-seqs 6 a batch of 5-6 ran PIECEWISE (attention eager). Both backends get max_seqs captured.
        sizes = sorted({1, 2, 4, *range(8, 2 * a.max_seqs + 1, 8), a.max_seqs})
        kw["compilation_config"] = {"cudagraph_capture_sizes": sizes}
    if a.backend != "default":
        kw["attention_backend"] = "HIP" if a.backend == "HIP_OFFLOAD" else a.backend
    if a.backend.startswith("HIP"):
        kw["additional_config"] = {"hip": json.loads(a.hip)}
    if a.backend == "HIP_OFFLOAD":
        # FlashAttention cannot read host pages, so dense prompt chunks would run on the slower Triton kernel
        kw["additional_config"]["hip"].pop("prefill_dense_below_seq_len", None)
        kw["additional_config"]["hip"]["offload"] = offload_config(a)
        print(json.dumps({"backend": a.backend, "event": "offload", "config": kw["additional_config"]["hip"]["offload"]}),
              flush=True)
    t0 = time.time()
    llm = LLM(**kw)
    startup = time.time() - t0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    cache_cfg = llm.llm_engine.vllm_config.cache_config
    pool_tokens = (cache_cfg.num_gpu_blocks or 0) * cache_cfg.block_size
    print(json.dumps({"backend": a.backend, "event": "startup", "s": round(startup, 1), "gpu": gpu,
                      "kv_pool_tokens": pool_tokens}), flush=True)

    def offload_stats() -> dict:
        try:
            from vllm_hip import kv_offload
        except ImportError:
            return {}
        return {f"offload_{k}": v for k, v in kv_offload.LAST_STATS.items() if k in ("hit_rate", "bytes_moved", "cache_bytes_filled")}
    g = torch.Generator().manual_seed(0)
    vocab = 4000 if a.smoke else 32000

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=torch.randint(100, vocab, (length,), generator=g).tolist())
                for _ in range(n)]

    eng = llm.llm_engine
    ids = iter(range(1 << 30))

    def write_profile(prof, py, ps, steps):
        name = f"{a.backend}_{len(ps[0]['prompt_token_ids'])}x{len(ps)}"
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
        cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        # The torch profiler sees ops and kernels, not plain Python (vLLM's scheduler, our builder): the next 16
        # steps under cProfile show where the rest of a step's host time goes.
        text = io.StringIO()
        for key in ("tottime", "cumulative"):
            pstats.Stats(py, stream=text).sort_stats(key).print_stats(35)
        Path(a.profile, f"profile_{name}.txt").write_text(
            f"16 decode steps (torch profiler)\n{table}\n\n{cpu}\n\n"
            f"{steps - 16} further decode steps (cProfile)\n{text.getvalue()}\n")

    gc_clock = GcClock()
    gc.callbacks.append(gc_clock)

    profile_this = False

    def run(ps, max_tokens):
        """All of ``ps`` at once through the engine, step by step: per-request time to first token, and the
        decode rate once every request has its first token (tokens after that moment / time after it)."""
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=a.detokenize)
        t0 = time.perf_counter()
        for p in ps:
            eng.add_request(f"b{next(ids)}", p, sp)
        first, ntok, t_all, tok_all = {}, {}, None, 0
        # profiled steps (16 under the torch profiler, then 16 under cProfile) are left out of the rate
        prof = py = None
        prof_steps, prof_s, prof_tok = 0, 0.0, 0
        full_steps, gc_s, gc_full = [], 0.0, 0
        while eng.has_unfinished_requests():
            if profile_this and t_all is not None and prof_steps == 0 and prof is None:
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
                prof.__enter__()
                p0, ptok0 = time.perf_counter(), sum(ntok.values())
            profiling = 0 < prof_steps + (prof is not None) <= 32
            t_step, gc0, full0 = time.perf_counter(), gc_clock.total, gc_clock.full
            outs = eng.step()
            now = time.perf_counter()
            if t_all is not None and not profiling and len(ntok) == len(ps) and all(
                    v < max_tokens for v in ntok.values()):
                full_steps.append(now - t_step)  # every request still decoding: a step of the full batch
                gc_s += gc_clock.total - gc0
                gc_full += gc_clock.full - full0
            for o in outs:
                ntok[o.request_id] = len(o.outputs[0].token_ids)
                if ntok[o.request_id] and o.request_id not in first:
                    first[o.request_id] = now - t0
            if profiling:
                prof_steps += 1
                if prof_steps == 16:  # 16 decode steps once every request decodes, then 16 under cProfile
                    prof.__exit__(None, None, None)
                    py = cProfile.Profile()
                    py.enable()
                elif prof_steps == 32:
                    py.disable()
                    prof_s, prof_tok = now - p0, sum(ntok.values()) - ptok0
            if t_all is None and len(first) == len(ps):
                t_all, tok_all = now, sum(ntok.values())
        t_end = time.perf_counter()
        if 0 < prof_steps < 16:  # the run ended inside a profiled window: close it, leave its steps out
            prof.__exit__(None, None, None)
        elif 16 <= prof_steps < 32:
            py.disable()
        if 0 < prof_steps < 32:
            prof_s, prof_tok = t_end - p0, sum(ntok.values()) - ptok0
        if prof_steps >= 16:
            write_profile(prof, py, ps, prof_steps)
        assert len(ntok) == len(ps) and all(v == max_tokens for v in ntok.values()), ntok
        ttft = sorted(first.values())
        return {"ttft_s": round(ttft[0], 3), "ttft_mean_s": round(sum(ttft) / len(ttft), 3),
                "ttft_last_s": round(ttft[-1], 3), "total_s": round(t_end - t0, 3),
                "decode_tok_s": round((sum(ntok.values()) - tok_all - prof_tok) / max(t_end - t_all - prof_s, 1e-9), 1),
                # median step while all requests decode (the rate above also covers the tail, as requests finish)
                "full_batch_step_ms": _pct(full_steps, 50),
                # spread of those steps: HiP's decode steps differ by how many requests refresh their masks
                "full_batch_step_ms_p10": _pct(full_steps, 10), "full_batch_step_ms_p90": _pct(full_steps, 90),
                "full_batch_steps": len(full_steps),
                # tokens per second over those steps alone: decode with exactly len(ps) requests in flight. The rate
                # above also covers the tail, where requests that started decoding first have finished.
                "full_batch_tok_s": round(len(ps) * len(full_steps) / sum(full_steps), 1) if full_steps else None,
                # garbage collection inside those steps: ms per step, and how many were full (generation 2)
                "full_batch_gc_ms": round(1e3 * gc_s / max(len(full_steps), 1), 2), "full_batch_gc_full": gc_full}

    # Warm-up: short prompts (dense prefill, decode graphs) and, for HiP, prompts past dense_below_seq_len, so
    # the HiP prefill kernels and mixed prefill+decode steps compile here and not inside a timed point.
    run(prompts(1, min(1024, max_len - 24)), 8)
    hip_cfg = json.loads(a.hip) if a.backend.startswith("HIP") else {}
    dense_below = max(hip_cfg.get("dense_below_seq_len", 0), hip_cfg.get("prefill_dense_below_seq_len", 0))
    if 0 < dense_below + 2048 <= max(a.lengths):
        run(prompts(3, dense_below + 2048), 8)
    if a.profile:
        os.makedirs(a.profile, exist_ok=True)
    for length in a.lengths:
        fits = max(1, min(a.max_seqs, pool_tokens // (length + a.output_len)))
        for n in sorted({fits} if a.only_full else {1, fits}):
            profile_this = bool(a.profile) and length == max(a.lengths)
            try:
                r = run(prompts(n, length), a.output_len)
            except Exception as e:  # report, keep measuring the other points
                print(json.dumps({"backend": a.backend, "len": length, "n": n, "error": repr(e)[:300]}), flush=True)
                continue
            r.update(offload_stats())
            r.update(backend=a.backend, len=length, n=n,
                     peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else 0.0)
            print(json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--backends", default="FLASH_ATTN,HIP", help="FLASH_ATTN, HIP, HIP_OFFLOAD (HIP + --offload)")
    # HipConfig's defaults (k 1024 + window 2048: the budget whose quality BENCHMARKS.md §4 measures; spelled out so
    # the log names them), with FlashAttention below 16K, where it is faster on the H200 (prefill: 32K until the
    # prefill tiles of 2026-12-02, which made a 16K HiP chunk ending at 32K cheaper than FA3's, BENCHMARKS.md §2)
    ap.add_argument("--hip", default=json.dumps({"k": 1024, "block_size_k": 8, "block_size_q": 64,
                                                  "sink_tokens": 128, "sliding_window": 2048, "norm_window": 1024,
                                                  "mask_refresh_interval": 8, "mask_coarse_interval": 64,
                                                  "dense_layers": [0, 1, 2], "dense_below_seq_len": 16384,
                                                  "prefill_dense_below_seq_len": 16384}))
    ap.add_argument("--model-dir", default="/tmp/llama8b-dummy")
    ap.add_argument("--tokenizer-dir", default=None, help="dir with tokenizer files (default: tiny test model)")
    ap.add_argument("--gpu-mem", type=float, default=0.9)
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--batched-tokens", type=int, default=16384)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--offload", default=json.dumps({"host_gib": 64}), help="hip.offload of HIP_OFFLOAD")
    ap.add_argument("--offload-cap", type=float, default=0.0,
                    help="HIP_OFFLOAD: GPU pages = this share of what --offload-reqs longest prompts need")
    ap.add_argument("--offload-reqs", type=int, default=1)
    ap.add_argument("--only-full", action="store_true", help="measure only the most concurrent requests that fit")
    ap.add_argument("--log", default=None)
    ap.add_argument("--detokenize", action="store_true",
                    help="detokenize outputs (off by default, as `vllm bench throughput --disable-detokenize`): on the "
                         "H200 the dummy model's random tokens made vLLM's incremental detokenizer cost ~11 ms per "
                         "request per step at 128K, the same host work for every backend, hiding the attention's")
    ap.add_argument("--profile", default=None, help="dir: torch profiler tables (16 decode steps) and a cProfile table (16 more) at each point of the longest length")
    ap.add_argument("--model-only", action="store_true", help="write the model dir (config + tokenizer) and exit")
    ap.add_argument("--smoke", action="store_true", help="a tiny Llama instead of 8B shapes (checks the script on CPU)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.lengths = [int(x) for x in a.lengths.split(",")]
    if a.worker:
        a.backend = a.worker
        worker(a)
        return
    tok_dir = Path(a.tokenizer_dir) if a.tokenizer_dir else None
    if tok_dir is None:
        sys.path.insert(0, str(HERE))
        import assets

        tok_dir = assets.make_tiny_llama()
    write_model_dir(Path(a.model_dir), tok_dir, max(a.lengths) + a.output_len + 16, smoke=a.smoke)
    if a.model_only:
        return
    rows = []
    log = open(a.log, "w") if a.log else None
    for backend in a.backends.split(","):
        # Rows are echoed and logged as they come, so a run cut short (a device time limit) keeps what it measured.
        cmd = [sys.executable, __file__, "--worker", backend] + [x for x in sys.argv[1:]]
        with tempfile.TemporaryFile("w+") as errf, subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=errf, text=True, env=dict(os.environ)) as proc:
            engine_log = open(f"{a.log}.{backend}.engine.txt", "w") if a.log else None
            for line in proc.stdout:
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    print(line, end="", flush=True)
                    if log:
                        log.write(line)
                        log.flush()
                elif engine_log:  # vLLM's own log (start-up, jit_monitor warnings, HIP's notices)
                    engine_log.write(line)
                    engine_log.flush()
            proc.wait()
            errf.seek(0)
            err = errf.read()
            if engine_log:
                engine_log.write(err)
                engine_log.close()
        if proc.returncode:
            print(f"[{backend}] exit {proc.returncode}:\n{err[-4000:]}", file=sys.stderr)
    if log:
        log.close()
    gpu = next((r["gpu"] for r in rows if r.get("event") == "startup"), "?")
    shapes = "a tiny Llama (--smoke)" if a.smoke else "Llama-3.1-8B shapes"
    print(f"\nvLLM offline throughput, {shapes} (dummy weights), device: {gpu}, detokenize: {'on' if a.detokenize else 'off'}")
    for r in rows:
        if r.get("event") == "offload":
            print(f"HIP_OFFLOAD: hip.offload = {r['config']}")
    print(f"{'backend':<11}{'prompt':>8}{'reqs':>6}{'TTFT s':>9}{'TTFT mean s':>12}{'decode tok/s':>14}"
          f"{'full-batch tok/s':>18}{'step ms':>9}{'total s':>9}{'peak GiB':>10}")
    for r in rows:
        if "len" in r and "error" not in r:
            hit = f"  GPU hit rate {r['offload_hit_rate']:.3f}" if "offload_hit_rate" in r else ""
            if r.get("offload_cache_bytes_filled"):
                hit += f", selection cache filled {r['offload_cache_bytes_filled'] / 1e9:.1f} GB"
            step = r.get("full_batch_step_ms")
            full = r.get("full_batch_tok_s")
            print(f"{r['backend']:<11}{r['len']:>8}{r['n']:>6}{r['ttft_s']:>9.3f}{r['ttft_mean_s']:>12.3f}"
                  f"{r['decode_tok_s']:>14.1f}{full if full is not None else '-':>18}"
                  f"{step if step is not None else '-':>9}{r['total_s']:>9.1f}"
                  f"{r['peak_mem_gib']:>10.1f}{hit}")
        elif "error" in r:
            print(f"{r['backend']:<11}{r['len']:>8}{r['n']:>6}  error: {r['error'][:80]}")
    for r in rows:
        if r.get("event") == "startup":
            print(f"{r['backend']}: startup {r['s']} s, KV pool {r['kv_pool_tokens']} tokens")


if __name__ == "__main__":
    main()
