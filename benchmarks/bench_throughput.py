"""End-to-end vLLM throughput: FLASH_ATTN vs HIP on a Llama-3.1-8B-shaped model with dummy weights.

    python benchmarks/bench_throughput.py --lengths 8192,32768,131072 --output-len 256 --log $OUT/tp.jsonl

Each (backend) runs in its own process (one engine, all workloads). Per prompt length it measures, with
prefix caching off and random token prompts:
* time to first token: ``generate(max_tokens=1)`` on one request;
* decode throughput at concurrency 1 and at the most requests whose KV fits the engine's KV pool:
  ``(N * (out_len - 1)) / (t(generate out_len) - t(generate 1))`` over the same N prompts;
and prints one table with the GPU named. Weights are random (``load_format="dummy"``): speed only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


def write_model_dir(path: Path, tokenizer_dir: Path, max_len: int) -> Path:
    """config.json of Llama-3.1-8B shapes plus a small local tokenizer (prompts are token ids anyway)."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(LLAMA_8B, max_position_embeddings=max(max_len, 131072))
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            (path / f.name).write_bytes(f.read_bytes())
    return path


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
    if a.backend != "default":
        kw["attention_backend"] = a.backend
    if a.backend == "HIP":
        kw["additional_config"] = {"hip": json.loads(a.hip)}
    t0 = time.time()
    llm = LLM(**kw)
    startup = time.time() - t0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    cache_cfg = llm.llm_engine.vllm_config.cache_config
    pool_tokens = (cache_cfg.num_gpu_blocks or 0) * cache_cfg.block_size
    print(json.dumps({"backend": a.backend, "event": "startup", "s": round(startup, 1), "gpu": gpu,
                      "kv_pool_tokens": pool_tokens}), flush=True)
    g = torch.Generator().manual_seed(0)
    vocab = 32000

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=torch.randint(100, vocab, (length,), generator=g).tolist())
                for _ in range(n)]

    def timed(ps, max_tokens):
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return time.perf_counter() - t

    timed(prompts(1, 1024), 8)  # warm-up (Triton compilation, graph capture leftovers)
    for length in a.lengths:
        fits = max(1, min(a.max_seqs, pool_tokens // (length + a.output_len)))
        for n in sorted({1, fits}):
            ps = prompts(n, length)
            try:
                t1 = timed(ps, 1)
                tn = timed(ps, a.output_len)
            except Exception as e:  # report, keep measuring the other points
                print(json.dumps({"backend": a.backend, "len": length, "n": n, "error": repr(e)[:300]}), flush=True)
                continue
            dec = n * (a.output_len - 1) / max(tn - t1, 1e-9)
            print(json.dumps({"backend": a.backend, "len": length, "n": n, "prefill_s": round(t1, 3), "total_s": round(tn, 3), "decode_tok_s": round(dec, 1),
                              "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else 0.0}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--backends", default="FLASH_ATTN,HIP")
    ap.add_argument("--hip", default=json.dumps({"k": 2048, "block_size_k": 16, "block_size_q": 64,
                                                  "sink_tokens": 128, "sliding_window": 1024,
                                                  "dense_layers": [0, 1, 2], "dense_below_seq_len": 8192}))
    ap.add_argument("--model-dir", default="/tmp/llama8b-dummy")
    ap.add_argument("--tokenizer-dir", default=None, help="dir with tokenizer files (default: tiny test model)")
    ap.add_argument("--gpu-mem", type=float, default=0.9)
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--batched-tokens", type=int, default=16384)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--log", default=None)
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
    write_model_dir(Path(a.model_dir), tok_dir, max(a.lengths) + a.output_len + 16)
    rows = []
    for backend in a.backends.split(","):
        cmd = [sys.executable, __file__, "--worker", backend] + [x for x in sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
        if proc.returncode:
            print(f"[{backend}] exit {proc.returncode}:\n{proc.stderr[-4000:]}", file=sys.stderr)
    if a.log:
        Path(a.log).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    gpu = next((r["gpu"] for r in rows if r.get("event") == "startup"), "?")
    print(f"\nvLLM offline throughput, Llama-3.1-8B shapes (dummy weights, bf16), GPU: {gpu}")
    print(f"{'backend':<11}{'prompt':>8}{'reqs':>6}{'TTFT/prefill s':>16}{'decode tok/s':>14}{'peak GiB':>10}")
    for r in rows:
        if "len" in r and "error" not in r:
            print(f"{r['backend']:<11}{r['len']:>8}{r['n']:>6}{r['prefill_s']:>16.3f}{r['decode_tok_s']:>14.1f}"
                  f"{r['peak_mem_gib']:>10.1f}")
        elif "error" in r:
            print(f"{r['backend']:<11}{r['len']:>8}{r['n']:>6}  error: {r['error'][:80]}")
    for r in rows:
        if r.get("event") == "startup":
            print(f"{r['backend']}: startup {r['s']} s, KV pool {r['kv_pool_tokens']} tokens")


if __name__ == "__main__":
    main()
