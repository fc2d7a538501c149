"""Quality of HiP vs dense attention on SmolLM2-135M (CPU or GPU): passkey grid, perplexity, per-layer error,
and a sweep of the HiP knobs. Results: BENCHMARKS_quality.md.

    .venv/bin/python benchmarks/bench_quality.py vllm     # (a) passkey grid + (b) perplexity, through vLLM's LLM
    .venv/bin/python benchmarks/bench_quality.py layers   # (c) per-layer error / recall on captured Q/K/V
    .venv/bin/python benchmarks/bench_quality.py sweep    # (d) knob sweep (captured Q/K/V + HiP inside transformers)
    .venv/bin/python benchmarks/bench_quality.py turnover # (e) how much decode selections change per refresh
    .venv/bin/python benchmarks/bench_quality.py all

(a)+(b) run one fresh process per backend ("dense" = vLLM's default backend, "hip" = attention_backend="HIP"
with ``--hip``), each doing all passkey prompts (greedy, 8 tokens) and all perplexity texts
(``prompt_logprobs``) in one ``LLM``. The grid is ``--lengths x --depths x --seeds``; the passkey wording and
checking are ``benchmarks/assets.py``'s. Perplexity uses the Gutenberg plays (``assets.plays_text``, never used
for tuning), one window per length. Outputs: printed tables, ``<out>/quality_passkey_<backend>.png`` heat maps
and ``<out>/quality_<what>.json``.

(c) captures post-RoPE Q/K/V of every layer of SmolLM2 on ``--tokens`` tokens of the plays (transformers, a
forward pre-hook per attention module) and compares ``kernels/reference.py``'s HiP with dense attention on the
query blocks where HiP prunes (``quality_lib.layer_metrics``), plus simulated decode with mask reuse.

(e) on the same captured Q/K: the share of a decoding request's selected KV pages (and (head, block) pairs) that
each mask refresh replaces, against uniformly random selections of the same sizes (``quality_lib.selection_turnover``):
what a KV-offload tier would have to move per refresh on a trained model, and on the dummy weights of the H200
benchmark.

(d) varies one knob at a time around ``--hip`` and reports the (c) metrics averaged over the HiP layers and the
whole-model perplexity with HiP swapped into transformers (``quality_lib.HipSim``, same masks as the backend).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in ENGINE_ENV.items():
    os.environ.setdefault(_k, _v)

PPL_OFFSET = 20000  # tokens of the plays skipped before the perplexity window (the CI slice uses offset 1000)
LAYER_OFFSET = 60000  # plays offset for (c)/(d)


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (CPU only)"


def header(cmd: str) -> str:
    return f"command: {cmd}\ndate: {datetime.datetime.now().isoformat(timespec='minutes')}\nmachine: {machine()}"


# ------------------------------------------------------------------------------ vLLM child process
def run_child(spec: dict) -> dict:
    """One backend in this (fresh) process: passkey generations then perplexity windows."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(model=spec["model"], enforce_eager=True, seed=0, dtype=spec.get("dtype", "float32"),
              max_model_len=spec.get("max_model_len", 8192))
    if spec.get("max_num_batched_tokens"):  # chunked prefill: bounds the prompt-logprob logits per step
        kw["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    hip = spec.get("hip")
    is_hip = spec["backend"].startswith("hip")
    if is_hip:
        kw["attention_backend"] = "HIP"
        kw["additional_config"] = {"hip": dict(hip or {}, record_stats=True)}
    t0 = time.time()
    llm = LLM(**kw)
    res = {"startup_s": round(time.time() - t0, 1)}
    stats = None
    if is_hip:
        from vllm_hip import stats
    if spec.get("passkey"):
        if stats:
            stats.reset()
        sp = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 8))
        t0 = time.time()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p["ids"]) for p in spec["passkey"]], sp, use_tqdm=False)
        res["passkey_s"] = round(time.time() - t0, 1)
        res["passkey"] = [o.outputs[0].text for o in outs]
        if stats:
            res["passkey_attended"] = stats.attended_fraction()
    if spec.get("ppl"):
        if stats:
            stats.reset()
        sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        t0 = time.time()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p["ids"]) for p in spec["ppl"]], sp, use_tqdm=False)
        res["ppl_s"] = round(time.time() - t0, 1)
        nll = []
        for o, p in zip(outs, spec["ppl"]):
            ids = p["ids"]
            nll.append([-o.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        res["nll"] = nll
        if stats:
            res["ppl_attended"] = stats.attended_fraction()
    del llm
    gc.collect()
    return res


def spawn(spec: dict, timeout: int = 7200) -> dict:
    """Run ``spec`` in a fresh interpreter (vLLM keeps process-wide state); returns its result."""
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    spec_file = Path(f"/tmp/bench_quality_spec_{os.getpid()}_{spec['backend']}.json")
    out_file = spec_file.with_suffix(".out.json")
    spec_file.write_text(json.dumps(spec))
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_child", str(spec_file), str(out_file)],
                           env=env, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{spec['backend']} job failed (exit {p.returncode}):\n{p.stderr[-5000:]}")
        return json.loads(out_file.read_text())
    finally:
        spec_file.unlink(missing_ok=True)
        out_file.unlink(missing_ok=True)


# -------------------------------------------------------------------------------- (a) + (b): vLLM
def build_inputs(tok, lengths, depths, seeds, ppl_lengths):
    import assets
    import quality_lib as ql

    hay = assets.haystack_text()
    passkey = []
    for L in lengths:
        for s in seeds:
            for depth, key, prompt in ql.passkey_cases(tok, L, depths, seed=s, haystack=hay, offset=3000 * s):
                passkey.append({"length": L, "seed": s, "depth": depth, "key": key, "ids": tok.encode(prompt)})
    plays = assets.plays_text()
    ppl = [{"length": L, "ids": ql.text_ids(tok, plays, L, offset=PPL_OFFSET)} for L in ppl_lengths]
    return passkey, ppl


def heatmap(path: Path, title: str, lengths, depths, acc) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 1.0 * len(lengths)), 1.4 + 0.45 * len(depths)))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{L // 1000}K" if L >= 1000 else str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{acc[i][j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=8, wrap=True)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_plot(a) -> None:
    """Redraw the heat maps from ``<out>/quality_vllm.json``."""
    d = json.loads((Path(a.out) / "quality_vllm.json").read_text())
    for b, acc in d["accuracy"].items():
        conf = {"hip": json.dumps(d["hip"]) if d["hip"] else "(HipConfig defaults)",
                "hip-default": "(HipConfig defaults)"}.get(b, "")
        heatmap(Path(a.out) / f"quality_passkey_{b}.png", f"SmolLM2-135M passkey, vLLM {b}\n{conf}",
                d["lengths"], d["depths"], acc)


def cmd_vllm(a) -> dict:
    import assets
    import quality_lib as ql
    from transformers import AutoTokenizer

    model = str(assets.qwen_dir() if a.model == "qwen" else assets.smollm2_dir())
    max_len = 32768 if a.model == "qwen" else 8192
    tok = AutoTokenizer.from_pretrained(model)
    lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else []
    depths = [float(x) for x in a.depths.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    ppl_lengths = [int(x) for x in a.ppl_lengths.split(",")] if a.ppl_lengths else []
    passkey, ppl_in = build_inputs(tok, lengths, depths, seeds, ppl_lengths)
    results = {}
    for backend in a.backends.split(","):
        hip = {} if backend == "hip-default" else a.hip
        spec = {"model": model, "backend": backend, "hip": hip, "passkey": passkey, "ppl": ppl_in,
                "max_model_len": max_len, "dtype": a.dtype,
                # Qwen's 152K vocabulary: 2,048-token chunks keep a chunk's prompt-logprob logits at ~1.2 GB
                "max_num_batched_tokens": 2048 if a.model == "qwen" else None}
        t0 = time.time()
        results[backend] = spawn(spec)
        results[backend]["wall_s"] = round(time.time() - t0, 1)
        brief = {k: v for k, v in results[backend].items() if k not in ("nll", "passkey") and "attended" not in k}
        print(f"[bench_quality] {backend}: {json.dumps(brief)}", flush=True)

    lines = [header(a.cmdline), f"model: {Path(model).name}; HiP config: {json.dumps(a.hip)} (on top of HipConfig "
             f"defaults); dtype {a.dtype}", ""]
    out = {"hip": a.hip, "lengths": lengths, "depths": depths, "seeds": seeds, "results": {}}
    if passkey:
        ok = {b: [assets.answer_ok(t, p["key"]) for t, p in zip(r["passkey"], passkey)] for b, r in results.items()}
        lines.append(f"(a) passkey accuracy (fraction of {len(seeds)} seed(s); prompt tokens "
                     f"{min(len(p['ids']) for p in passkey)}-{max(len(p['ids']) for p in passkey)})")
        head = "| depth | " + " | ".join(f"{b} {L}" for L in lengths for b in results) + " |"
        lines += [head, "|" + "---|" * (1 + len(lengths) * len(results))]
        acc = {b: [[0.0] * len(lengths) for _ in depths] for b in results}
        for i, d in enumerate(depths):
            cells = []
            for j, L in enumerate(lengths):
                for b in results:
                    sel = [o for o, p in zip(ok[b], passkey) if p["length"] == L and p["depth"] == d]
                    acc[b][i][j] = sum(sel) / len(sel)
                    cells.append(f"{acc[b][i][j]:.2f}")
            lines.append(f"| {d:.0%} | " + " | ".join(cells) + " |")
        for hb in [b for b in ok if b.startswith("hip") and "dense" in ok]:
            dr = [i for i, o in enumerate(ok["dense"]) if o]
            both = sum(ok[hb][i] for i in dr)
            extra = sum(1 for i, o in enumerate(ok[hb]) if o and not ok["dense"][i])
            lines.append(f"{hb}: right on {both}/{len(dr)} prompts where dense is right, and on {extra} where dense "
                         f"is wrong; totals dense {sum(ok['dense'])}/{len(passkey)}, {hb} {sum(ok[hb])}/{len(passkey)}")
            for i in dr:
                if not ok[hb][i]:
                    p = passkey[i]
                    lines.append(f"  {hb} miss: length {p['length']} depth {p['depth']:.2f} seed {p['seed']} "
                                 f"key {p['key']} -> {results[hb]['passkey'][i]!r}")
        for b in results:
            png = Path(a.out) / f"quality_passkey_{b}.png"
            conf = {"hip": f" {json.dumps(a.hip)}", "hip-default": " (HipConfig defaults)"}.get(b, "")
            try:
                heatmap(png, f"SmolLM2-135M passkey, vLLM {b}\n{conf.strip()}", lengths, depths, acc[b])
            except ImportError:
                lines.append("heat map skipped: matplotlib is not installed (.venv/bin/pip install matplotlib)")
                break
            lines.append(f"heat map: {png.relative_to(REPO) if png.is_relative_to(REPO) else png}")
        out["passkey"] = [{k: v for k, v in p.items() if k != "ids"} | {b: results[b]["passkey"][i] for b in results}
                          for i, p in enumerate(passkey)]
        out["accuracy"] = acc
    if ppl_in:
        lines += ["", "(b) perplexity on the Gutenberg plays (offset "
                  f"{PPL_OFFSET} tokens), all predicted tokens / tokens after position 1024"]
        hips = [b for b in results if b.startswith("hip") and "dense" in results]
        lines += ["| tokens | " + " | ".join(f"{b} all | {b} >1024" for b in results) + " | "
                  + " | ".join(f"{b}/dense all | {b}/dense >1024" for b in hips) + " |",
                  "|---|" + "---|---|" * (len(results) + len(hips))]
        out["ppl"] = []
        import torch

        for i, p in enumerate(ppl_in):
            vals = {}
            for b, r in results.items():
                nll = torch.tensor(r["nll"][i])
                vals[b] = (ql.ppl(nll), ql.ppl(nll, 1023))
            rel = [f"{vals[b][j] / vals['dense'][j] - 1:+.2%}" for b in hips for j in (0, 1)]
            lines.append(f"| {p['length']} | " + " | ".join(f"{v[0]:.3f} | {v[1]:.3f}" for v in vals.values())
                         + " | " + " | ".join(rel) + " |")
            out["ppl"].append({"length": p["length"], **{b: v for b, v in vals.items()}})
    lines.append("")
    for b, r in results.items():
        lines.append(f"{b}: startup {r['startup_s']} s, passkey {r.get('passkey_s')} s, ppl {r.get('ppl_s')} s, "
                     f"job wall {r['wall_s']} s")
        for ph in ("passkey_attended", "ppl_attended"):
            if r.get(ph):
                f = r[ph]
                fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
                lines.append(f"  HiP attended fraction of causal keys ({ph.split('_')[0]} job, all layers): overall "
                             f"{fmt(f['overall'])}, prefill {fmt(f['prefill'])}, decode {fmt(f['decode'])}")
    report = "\n".join(lines)
    print(report)
    out["results"] = {b: {k: v for k, v in r.items() if k != "nll"} for b, r in results.items()}
    (Path(a.out) / "quality_vllm.json").write_text(json.dumps(out, indent=1, default=str))
    return out


# -------------------------------------------------------------------------- (c) per-layer metrics
def capture(tokens: int, offset: int = LAYER_OFFSET):
    import assets
    import quality_lib as ql

    model, tok = ql.load_smollm2()
    ids = ql.text_ids(tok, assets.plays_text(), tokens, offset=offset)
    t0 = time.time()
    caps = ql.capture_qkv(model, ids)
    return model, tok, ids, caps, time.time() - t0


def layer_table(caps, cfg, max_blocks, decode_steps, mask_fn=None):
    import quality_lib as ql

    per = []
    for c in caps:
        m = ql.layer_metrics(c["q"], c["k"], c["v"], c["scale"], cfg, max_blocks=max_blocks, mask_fn=mask_fn)
        if decode_steps:
            dm = ql.decode_metrics(c["q"], c["k"], c["v"], c["scale"], cfg, steps=decode_steps)
            m["dec_rel_l2"], m["dec_mass"], m["dec_recall"] = dm["rel_l2"], dm["mass"], dm["recall_all"]
        per.append(m)
    return per


def cmd_layers(a) -> dict:
    import quality_lib as ql

    cfg = ql._cfg(a.hip)
    _, _, ids, caps, t_cap = capture(a.tokens)
    t0 = time.time()
    mask_fn = None
    if a.mask == "oracle":  # exact top-n blocks under HiP's block score: the ceiling of the selection
        from mask_variants import mask_oracle as mask_fn
    elif a.mask in ("summary", "shortlist"):  # from per-page max/min key summaries (what a KV offload could keep on
        from mask_variants import mask_summary_for  # the GPU), alone or shortlisting 4 x k for an exact stage
        mask_fn = mask_summary_for(cfg, shortlist=4 if a.mask == "shortlist" else 0)
    per = layer_table(caps, cfg, a.max_blocks, a.decode_steps if a.mask == "v3" else 0, mask_fn)
    t_m = time.time() - t0
    cols = ["rel_l2", "recall_all", "recall_sel", "block_recall", "mass"] + (
        ["dec_rel_l2", "dec_mass", "dec_recall"] if a.decode_steps and a.mask == "v3" else [])
    lines = [header(a.cmdline), f"HiP config: {json.dumps(cfg.to_dict())}; selection: {a.mask}",
             f"{a.tokens} tokens of the plays (offset {LAYER_OFFSET}); {a.max_blocks} pruned query blocks per layer "
             f"(evenly spaced); decode: last {a.decode_steps} positions; capture {t_cap:.0f} s, metrics {t_m:.0f} s", "",
             "| layer | " + " | ".join(cols) + " | scored blocks |", "|---|" + "---|" * (len(cols) + 1)]
    for i, m in enumerate(per):
        tag = " (dense in config)" if i in cfg.dense_layers else ""
        lines.append(f"| {i}{tag} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + f" | {m['blocks']} |")
    mean = ql.summarize(per, skip=cfg.dense_layers)
    mean_all = ql.summarize(per)
    lines.append("| mean, HiP layers | " + " | ".join(f"**{mean[c]:.3f}**" for c in cols) + " | |")
    lines.append("| mean, all 30 | " + " | ".join(f"{mean_all[c]:.3f}" for c in cols) + " | |")
    print("\n".join(lines))
    res = {"config": cfg.to_dict(), "per_layer": per, "mean_hip_layers": mean, "mean_all": mean_all}
    name = "quality_layers.json" if a.mask == "v3" else f"quality_layers_{a.mask}.json"
    (Path(a.out) / name).write_text(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------------------------- (e) turnover
def cmd_turnover(a) -> dict:
    import quality_lib as ql

    cfg = ql._cfg(a.hip)
    _, _, ids, caps, t_cap = capture(a.tokens)
    t0 = time.time()
    per = [ql.selection_turnover(c["q"], c["k"], cfg, steps=a.decode_steps, page=a.page) for c in caps]
    cols = ["page_turnover", "rand_page_turnover", "block_turnover", "rand_block_turnover", "sel_pages", "cand_pages"]
    lines = [header(a.cmdline), f"HiP config: {json.dumps(cfg.to_dict())}; KV page {a.page} tokens",
             f"{a.tokens} tokens of the plays (offset {LAYER_OFFSET}); decode: last {a.decode_steps} positions, "
             f"{per[0]['refreshes']} refreshes; capture {t_cap:.0f} s, selections {time.time() - t0:.0f} s", "",
             "| layer | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for i, m in enumerate(per):
        tag = " (dense in config)" if i in cfg.dense_layers else ""
        lines.append(f"| {i}{tag} | " + " | ".join(f"{m[c]:.3f}" if c.endswith("over") else f"{m[c]:.1f}"
                                                     for c in cols) + " |")
    hip = [m for i, m in enumerate(per) if i not in cfg.dense_layers]
    mean = {c: sum(m[c] for m in hip) / len(hip) for c in cols}
    lines.append("| mean, HiP layers | " + " | ".join(f"**{mean[c]:.3f}**" if c.endswith("over") else f"{mean[c]:.1f}"
                                                      for c in cols) + " |")
    print("\n".join(lines))
    res = {"config": cfg.to_dict(), "tokens": a.tokens, "page": a.page, "per_layer": per, "mean_hip_layers": mean}
    (Path(a.out) / f"quality_turnover_{a.tokens}.json").write_text(json.dumps(res, indent=1))
    (Path(a.out) / f"quality_turnover_{a.tokens}.txt").write_text("\n".join(lines) + "\n")
    return res


# ------------------------------------------------------------------------------------- (d) sweep
SWEEP = [  # one knob at a time around --hip
    ("k", [256, 1024]),
    ("block_size_k", [2, 4, 8, 16]),
    ("sink_tokens", [0, 64]),
    ("sliding_window", [128, 512]),
    ("dense_layers", [[], [0, 1, 2, 3, 4]]),
]
REFRESH = [1, 4, 8, 16, 32]


def cmd_sweep(a) -> dict:
    import quality_lib as ql

    base = dict(a.hip)
    model, tok, ids, caps, _ = capture(a.tokens)
    rows = []
    t_all = time.time()
    dense_nll = ql.token_nll(model, ids)
    dense_ppl = ql.ppl(dense_nll, 1023)

    def evaluate(name, over):
        raw = dict(base, **over)
        d = ql.HipConfig()
        sink, bk = raw.get("sink_tokens", d.sink_tokens), raw.get("block_size_k", d.block_size_k)
        if sink % bk:  # keep the config valid (sink must be a multiple of the key block)
            raw["sink_tokens"] = sink // bk * bk
        cfg = ql._cfg(raw)
        t0 = time.time()
        per = [ql.layer_metrics(c["q"], c["k"], c["v"], c["scale"], cfg, max_blocks=a.max_blocks) for c in caps]
        mean = ql.summarize(per, skip=cfg.dense_layers)
        p = ql.ppl(ql.token_nll(model, ids, ql.HipSim(cfg)), 1023) if a.sim_ppl else float("nan")
        row = {"name": name, "over": over, **mean, "ppl": p, "ppl_rel": p / dense_ppl - 1, "s": time.time() - t0}
        rows.append(row)
        print(f"[sweep] {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in row.items() if k not in ("name", "over")), flush=True)
        return row

    evaluate("base", {})
    for knob, values in SWEEP:
        for v in values:
            if getattr(ql._cfg(base), knob) == (tuple(v) if isinstance(v, list) else v):
                continue
            evaluate(f"{knob}={v}", {knob: v})
    # decode: refresh interval, on the base config, simulated on the captured Q/K/V
    dec = []
    for r in REFRESH:
        cfg = ql._cfg(dict(base, mask_refresh_interval=r))
        ms = [ql.decode_metrics(c["q"], c["k"], c["v"], c["scale"], cfg, steps=a.decode_steps)
              for i, c in enumerate(caps) if i not in cfg.dense_layers]
        dec.append({"interval": r, "rel_l2": sum(m["rel_l2"] for m in ms) / len(ms),
                    "mass": sum(m["mass"] for m in ms) / len(ms)})
        print(f"[sweep] refresh {r}: {dec[-1]}", flush=True)

    lines = [header(a.cmdline), f"base: {json.dumps(base)} on HipConfig defaults; {a.tokens} tokens of the plays "
             f"(offset {LAYER_OFFSET}); metrics = mean over HiP layers of the pruned query blocks "
             f"({a.max_blocks} per layer); ppl = whole model with HiP in transformers (HipSim), predictions "
             f"after position 1024; dense ppl {dense_ppl:.3f}; total {time.time() - t_all:.0f} s", "",
             "| change | rel_l2 | recall_all | recall_sel | block_recall | mass | ppl | vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['rel_l2']:.3f} | {r['recall_all']:.3f} | {r['recall_sel']:.3f} | "
                     f"{r['block_recall']:.3f} | {r['mass']:.3f} | {r['ppl']:.3f} | {r['ppl_rel']:+.2%} |")
    lines += ["", f"decode, mask reused for N steps (last {a.decode_steps} positions as decode queries, teacher forcing):",
              "| refresh interval | rel_l2 | mass |", "|---|---|---|"]
    lines += [f"| {d['interval']} | {d['rel_l2']:.3f} | {d['mass']:.3f} |" for d in dec]
    print("\n".join(lines))
    res = {"base": base, "dense_ppl": dense_ppl, "rows": rows, "decode": dec}
    (Path(a.out) / "quality_sweep.json").write_text(json.dumps(res, indent=1, default=str))
    return res


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["vllm", "layers", "sweep", "turnover", "all", "plot", "_child"])
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--hip", type=json.loads, default={}, help="additional_config['hip'] as JSON (default: defaults)")
    ap.add_argument("--backends", default="dense,hip",
                    help="dense (vLLM's default backend), hip (HIP with --hip), hip-default (HIP, HipConfig defaults)")
    ap.add_argument("--lengths", default="1000,2000,4000,8000", help="passkey prompt lengths (tokens)")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--ppl-lengths", default="2048,4096,8000")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", choices=["smollm2", "qwen"], default="smollm2",
                    help="vllm: SmolLM2-135M (8K context) or Qwen2.5-Coder-0.5B (32K; assets.qwen_dir, built on demand)")
    ap.add_argument("--tokens", type=int, default=4096, help="(c)/(d): captured sequence length")
    ap.add_argument("--max-blocks", type=int, default=16, help="(c)/(d): pruned query blocks scored per layer")
    ap.add_argument("--decode-steps", type=int, default=32, help="(c)/(d): simulated decode steps")
    ap.add_argument("--mask", choices=["v3", "oracle", "summary", "shortlist"], default="v3",
                    help="(c): the backend's selection (v3), the exact top-n blocks (oracle, its ceiling), or whole "
                         "16-key pages ranked by max/min key summaries (summary, mask_variants.mask_summary), or those "
                         "summaries shortlisting 4 x k for an exact stage (shortlist)")
    ap.add_argument("--page", type=int, default=16, help="(e): KV page size in tokens (vLLM's block size)")
    ap.add_argument("--no-sim-ppl", dest="sim_ppl", action="store_false", help="(d): skip the HipSim perplexity")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    a.cmdline = "python benchmarks/bench_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.command == "_child":
        spec = json.loads(Path(a.rest[0]).read_text())
        Path(a.rest[1]).write_text(json.dumps(run_child(spec)))
        return 0
    import torch

    torch.manual_seed(0)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.command == "plot":
        cmd_plot(a)
        return 0
    if a.command in ("vllm", "all"):
        cmd_vllm(a)
    if a.command in ("layers", "all"):
        cmd_layers(a)
    if a.command in ("sweep", "all"):
        cmd_sweep(a)
    if a.command == "turnover":
        cmd_turnover(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
