"""Closed-loop load test of a HIP ``vllm serve`` on loopback: N clients for a fixed time, mixed prompt lengths.

Each client thread sends one completion request at a time (a fresh slice of the Britannica haystack, as token
ids, of a length drawn from ``--lengths``; streamed or not; ``ignore_eos`` so every request generates
``--max-tokens`` tokens) until ``--duration`` seconds have
passed or ``--max-requests`` requests have been sent in all. Then it waits for the last requests, checks
through ``/metrics`` that nothing is running and no KV block is held, and prints requests served, errors,
p50/p99 latency, time to first token, throughput and the idle check (``--json`` for one JSON line).

By default it starts its own server (the tiny random Llama, HiP active on every layer) and stops it at the
end; ``--url http://127.0.0.1:PORT`` uses a running one instead. Only loopback addresses are accepted.

    .venv/bin/python benchmarks/load_test.py --clients 4 --duration 60
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --model MODEL --clients 8
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

import assets  # noqa: E402
from server_util import Server, ServerError, hip_serve_args  # noqa: E402

DEFAULT_HIP = {"dense_layers": [], "k": 64, "block_size_k": 4, "block_size_q": 16, "sink_tokens": 8,
               "sliding_window": 48}
LIMITS = {"clients": 64, "duration": 600, "max_requests": 10000}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-q * len(v) // 100)) - 1))
    return v[k]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.out_tokens = 0
        self.prompt_tokens = 0
        self.errors: dict[str, int] = {}
        self.sent = 0

    def error(self, e: BaseException) -> None:
        key = f"{type(e).__name__}: {str(e)[:120]}"
        with self.lock:
            self.errors[key] = self.errors.get(key, 0) + 1


def client_loop(idx: int, base: str, model: str, prompts: "PromptSource", args, stats: Stats, stop_at: float) -> None:
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="EMPTY", max_retries=0, timeout=args.request_timeout)
    rng = random.Random(args.seed * 1000 + idx)
    try:
        while time.monotonic() < stop_at:
            with stats.lock:
                if stats.sent >= args.max_requests:
                    return
                stats.sent += 1
            prompt = prompts.pick(rng)
            stream = rng.random() < args.stream_fraction
            t0 = time.monotonic()
            try:
                if stream:
                    first, n_out, usage = None, 0, None
                    for ch in client.completions.create(
                            model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0.0, stream=True,
                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                        if ch.choices and ch.choices[0].text and first is None:
                            first = time.monotonic() - t0
                        usage = ch.usage or usage
                    n_out = usage.completion_tokens if usage else 0
                    n_in = usage.prompt_tokens if usage else 0
                else:
                    r = client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens,
                                                  temperature=0.0, extra_body={"ignore_eos": True})
                    first, n_out, n_in = None, r.usage.completion_tokens, r.usage.prompt_tokens
                dt = time.monotonic() - t0
                if n_out != args.max_tokens:
                    raise RuntimeError(f"got {n_out} tokens, asked for {args.max_tokens}")
                with stats.lock:
                    stats.latency.append(dt)
                    if first is not None:
                        stats.ttft.append(first)
                    stats.out_tokens += n_out
                    stats.prompt_tokens += n_in
            except Exception as e:  # counted, the client goes on
                stats.error(e)
    finally:
        client.close()


class PromptSource:
    """Prompts as token ids of exact lengths: a fresh random slice of the haystack's tokens per request, so
    requests share no prefix (no prefix-cache hits) unless ``repeat`` fixes a small pool."""

    def __init__(self, base: str, model: str, lengths: list[int], seed: int, repeat: int = 0,
                 want_tokens: int = 40000):
        text = assets.haystack_text()
        self.ids: list[int] = []
        for pos in range(0, len(text), 3000):  # pieces well under max_model_len for /tokenize
            self.ids += tokenize(base, model, text[pos:pos + 3000])
            if len(self.ids) >= want_tokens:
                break
        self.lengths = lengths
        if max(lengths) >= len(self.ids):
            raise SystemExit(f"--lengths up to {len(self.ids) - 1} tokens only")
        rng = random.Random(seed)
        self.pool = [self._cut(rng, rng.choice(lengths)) for _ in range(repeat)]

    def _cut(self, rng: random.Random, n: int) -> list[int]:
        start = rng.randrange(0, len(self.ids) - n)
        return self.ids[start:start + n]

    def pick(self, rng: random.Random) -> list[int]:
        return rng.choice(self.pool) if self.pool else self._cut(rng, rng.choice(self.lengths))


def tokenize(base: str, model: str, text: str) -> list[int]:
    import urllib.request

    req = urllib.request.Request(base + "/tokenize", data=json.dumps({"model": model, "prompt": text,
                                                                       "add_special_tokens": False}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["tokens"]


def run(args) -> dict:
    for key, hi in LIMITS.items():
        if not 1 <= getattr(args, key) <= hi:
            raise SystemExit(f"--{key.replace('_', '-')} must be in 1..{hi}")
    server = None
    if args.url:
        u = urlparse(args.url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("--url must be a loopback address (127.0.0.1, localhost, ::1)")
        base, model = args.url.rstrip("/"), args.model
        if not model:
            raise SystemExit("--model (the served model name) is required with --url")
        probe = Server.attach(base)
    else:
        model_path = args.model or str(assets.make_tiny_llama())
        common = ["--served-model-name", "load-test", "--dtype", args.dtype, "--enforce-eager",
                                    "--max-model-len", str(args.max_model_len), *args.serve_arg]
        # --backend default: vLLM's own attention (CPU_ATTN / FlashAttention), the dense baseline.
        serve_args = hip_serve_args(json.loads(args.hip), *common) if args.backend == "HIP" else common
        server = Server(model_path, serve_args, log_path=args.server_log)
        print(f"[load_test] starting: {' '.join(server.argv)}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        server.start()
        try:
            server.wait_ready(timeout=args.startup_timeout)
        except BaseException:
            server.stop()
            raise
        print(f"[load_test] server ready in {time.monotonic() - t0:.0f} s (log {server.log_path})",
              file=sys.stderr, flush=True)
        base, model, probe = server.base, "load-test", server
    try:
        prompts = PromptSource(base, model, args.lengths, args.seed, repeat=args.repeat_prompts)
        if max(args.lengths) + args.max_tokens > args.max_model_len:
            raise SystemExit("--lengths + --max-tokens must fit in --max-model-len")
        # One warm-up request (not counted) so the first client does not pay for lazy initialisation.
        import openai

        with openai.OpenAI(base_url=base + "/v1", api_key="EMPTY", max_retries=0, timeout=args.request_timeout) as c:
            c.completions.create(model=model, prompt=prompts.pick(random.Random(-1)), max_tokens=2, temperature=0.0)
        before = probe.metrics()
        stats = Stats()
        t_start = time.monotonic()
        stop_at = t_start + args.duration
        threads = [threading.Thread(target=client_loop, args=(i, base, model, prompts, args, stats, stop_at),
                                    daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.duration + args.request_timeout + 30)
        wall = time.monotonic() - t_start
        hung = sum(t.is_alive() for t in threads)
        try:
            idle = probe.wait_idle(timeout=60)
            idle_ok = True
        except ServerError as e:
            idle, idle_ok = {"error": str(e)}, False
        after = probe.metrics()
        hits = after.get("vllm:prefix_cache_hits_total", 0) - before.get("vllm:prefix_cache_hits_total", 0)
        queries = after.get("vllm:prefix_cache_queries_total", 0) - before.get("vllm:prefix_cache_queries_total", 0)
        served = len(stats.latency)
        result = {
            "clients": args.clients, "duration_s": args.duration, "seed": args.seed, "wall_s": round(wall, 1),
            "lengths_tokens": args.lengths, "max_tokens": args.max_tokens,
            "requests_sent": stats.sent, "requests_served": served, "errors": sum(stats.errors.values()),
            "error_kinds": stats.errors, "hung_clients": hung,
            "latency_p50_s": round(percentile(stats.latency, 50), 3),
            "latency_p99_s": round(percentile(stats.latency, 99), 3),
            "latency_max_s": round(max(stats.latency, default=float("nan")), 3),
            "ttft_p50_s": round(percentile(stats.ttft, 50), 3), "ttft_p99_s": round(percentile(stats.ttft, 99), 3),
            "req_per_s": round(served / wall, 3), "output_tok_per_s": round(stats.out_tokens / wall, 1),
            "prompt_tok_per_s": round(stats.prompt_tokens / wall, 1),
            "prefix_cache_hit_rate": round(hits / queries, 3) if queries else 0.0,
            "idle_after": idle, "kv_idle_ok": idle_ok,
        }
        if server is not None:
            result["server_ready_s"] = round(server.ready_s or float("nan"), 1)
        return result
    finally:
        if server is not None:
            server.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--url", help="a running server on loopback (default: start one)")
    ap.add_argument("--model", help="model path to serve, or the served name with --url (default: tiny Llama)")
    ap.add_argument("--hip", default=json.dumps(DEFAULT_HIP), help="hip config JSON for the started server")
    ap.add_argument("--backend", choices=["HIP", "default"], default="HIP",
                    help="attention backend of the started server (default = vLLM's own, dense)")
    ap.add_argument("--clients", type=int, default=4, help=f"concurrent clients (<= {LIMITS['clients']})")
    ap.add_argument("--duration", type=int, default=60, help=f"seconds of load (<= {LIMITS['duration']})")
    ap.add_argument("--max-requests", type=int, default=2000, help=f"total requests (<= {LIMITS['max_requests']})")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 1800],
                    help="prompt lengths in tokens, drawn uniformly")
    ap.add_argument("--repeat-prompts", type=int, default=0,
                    help="draw prompts from a pool of this many (prefix-cache hits); 0 = a fresh prompt each time")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--stream-fraction", type=float, default=0.5)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra vllm serve argument, repeatable; write --serve-arg=--max-num-seqs=32")
    ap.add_argument("--server-log", default=None)
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=None,
                    help="prompt draw seed (default: from the clock; printed). A seed repeated against the same "
                         "server repeats its prompts, which then hit the prefix cache")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time()) % 100000
    res = run(args)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>18}: {v}")
    return 0 if res["errors"] == 0 and res["kv_idle_ok"] and res["hung_clients"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
