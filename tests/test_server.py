"""The OpenAI-compatible server (``vllm serve``) with the HIP backend, driven the way users drive it.

One real server per module (start-up takes minutes on the CPU machine): the tiny random Llama, HiP active on
every layer (``HIP`` below prunes contexts above ~120 tokens), fp32, greedy. It is queried through the official
``openai`` client (plus raw HTTP where the test needs to control the connection), and its outputs are compared
with the offline ``LLM`` class run on the same prompts, config and scheduler limits (tests/vllm_runner.py).

While that server starts, two other jobs run beside it: the offline reference run, and a second ``vllm serve``
with an invalid ``hip`` config that must exit non-zero with the ``HipConfigError`` message.

Reproducibility against the offline run needs every prefill chunk boundary at a multiple of ``block_size_q``:
query blocks are aligned to absolute positions, but a chunk that ends inside a block leaves a partial block
whose mask is estimated from fewer queries, which on this random model changes greedy tokens. Both the server
and the offline run therefore use ``long_prefill_token_threshold=256`` (prefills advance in 256-token chunks,
a multiple of ``block_size_q``, while other requests are running) and a token budget (8192) that never cuts a
chunk shorter.
"""
from __future__ import annotations

import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import run_vllm
from server_util import Server, hip_serve_args

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE = HERE / "chat_template_plain.jinja"

HIP = {"dense_layers": [], "k": 64, "block_size_k": 4, "block_size_q": 16, "sink_tokens": 8,
       "sliding_window": 48}
MAX_MODEL_LEN = 2048
REF_TOKENS = 128  # the offline run generates this many tokens per prompt; tests compare prefixes
# Scheduler limits shared by the server and the offline run (see module docstring).
ENGINE = {"max_num_seqs": 32, "max_num_batched_tokens": 8192, "long_prefill_token_threshold": 256}
SERVED_NAME = "tiny-hip"
BAD_HIP = {"k": 64, "block_size_k": 3}
BAD_HIP_MESSAGE = "hip.block_size_k must be a power of two, got 3"


def _serve_args(hip: dict) -> list[str]:
    return hip_serve_args(
        hip, "--served-model-name", SERVED_NAME, "--dtype", "float32", "--enforce-eager", "--seed", "0",
        "--max-model-len", str(MAX_MODEL_LEN), "--chat-template", str(CHAT_TEMPLATE),
        "--max-num-seqs", str(ENGINE["max_num_seqs"]),
        "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
        "--long-prefill-token-threshold", str(ENGINE["long_prefill_token_threshold"]),
    )


def _prompts(text: str) -> dict[str, str]:
    """Named prompts cut from disjoint parts of the haystack (tiny tokenizer: ~3.7 characters a token)."""
    cuts = {"short": 150, "mid": 1300, "p900": 3400, "long": 5600}  # ~40 / 350 / 900 / 1500 tokens
    # Distinct prompts for the concurrency test, mixed lengths (~60 .. ~1700 tokens).
    for i in range(12):
        cuts[f"c{i}"] = (220, 1500, 4000, 6300)[i % 4] + 37 * i
    cuts["victim_a"] = 2600
    cuts["victim_b"] = 4400
    cuts["abortee"] = 7000  # ~1900 tokens, never sent to completion
    cuts["overlong"] = 11000  # ~3000 tokens > max_model_len
    out, pos = {}, 0
    for name, n in cuts.items():
        out[name] = text[pos : pos + n]
        pos += n + 17
    return out


CHAT_MESSAGES = [
    {"role": "system", "content": "You answer questions about Shakespeare."},
    {"role": "user", "content": "Summarise this passage: "},  # the passage is appended below
]


def _chat_messages(prompts) -> list[dict]:
    msgs = [dict(m) for m in CHAT_MESSAGES]
    msgs[1]["content"] += prompts["long"][:4400]  # ~1200 tokens: HiP prunes
    return msgs


def _render_chat(messages) -> str:
    """The prompt text the server builds from ``messages`` with CHAT_TEMPLATE (HF's Jinja settings)."""
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE.read_text()).render(messages=messages, add_generation_prompt=True)


class Stack:
    """The running server, the offline reference and helpers shared by the tests."""

    def __init__(self, server: Server, prompts: dict[str, str], ref: dict[str, list[int]]):
        self.server = server
        self.prompts = prompts
        self.ref = ref
        self.client = openai.OpenAI(base_url=server.base + "/v1", api_key="EMPTY", max_retries=0, timeout=300)

    def post(self, path: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
        req = urllib.request.Request(self.server.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def detok(self, ids: list[int]) -> str:
        status, body = self.post("/detokenize", {"model": SERVED_NAME, "tokens": ids})
        assert status == 200, body
        return body["prompt"]

    def complete(self, name: str, max_tokens: int = 24, **kw):
        extra = {"return_token_ids": True, "ignore_eos": True, **kw.pop("extra_body", {})}
        kw.setdefault("temperature", 0.0)
        return self.client.completions.create(model=SERVED_NAME, prompt=self.prompts[name], max_tokens=max_tokens,
                                              extra_body=extra, **kw)


def _start_reference(tiny_model: str, prompts: dict[str, str], chat_prompt: str):
    names = [n for n in prompts if n not in ("overlong", "abortee")]
    spec = {"model": tiny_model, "backend": "HIP", "hip": HIP, "engine": ENGINE, "max_tokens": REF_TOKENS,
            "prompts": [prompts[n] for n in names] + [chat_prompt]}
    box: dict = {}

    def job():
        t0 = time.monotonic()
        try:
            out = run_vllm(spec)
            box["ref"] = dict(zip(names + ["chat"], out["tokens"]))
        except BaseException as e:  # reported by the fixture that waits for it
            box["error"] = e
        box["seconds"] = time.monotonic() - t0

    th = threading.Thread(target=job, daemon=True)
    th.start()
    return th, box


@pytest.fixture(scope="module")
def launch(request, tiny_model, haystack, tmp_path_factory):
    """Start the HIP server, the bad-config server and the offline reference run side by side (the bad-config
    server only when its test was selected)."""
    logs = tmp_path_factory.mktemp("serve")
    prompts = _prompts(haystack)
    server = Server(tiny_model, _serve_args(HIP), log_path=logs / "hip.log").start()
    bad = Server(tiny_model, _serve_args(BAD_HIP), log_path=logs / "bad.log")
    if any(item.name == "test_invalid_hip_config_exits_nonzero_with_message" for item in request.session.items):
        bad.start()
    th, box = _start_reference(tiny_model, prompts, _render_chat(_chat_messages(prompts)))
    try:
        yield {"server": server, "bad": bad, "prompts": prompts, "ref_thread": th, "ref_box": box}
    finally:
        bad.stop()
        server.stop()
        th.join(timeout=60)
        print(f"\n[test_server] server ready after {server.ready_s} s; reference run "
              f"{box.get('seconds', float('nan')):.0f} s; logs in {logs}")


@pytest.fixture(scope="module")
def stack(launch):
    server = launch["server"].wait_ready(timeout=900)
    launch["ref_thread"].join(timeout=900)
    box = launch["ref_box"]
    if "error" in box:
        raise box["error"]
    assert "ref" in box, "offline reference run did not finish"
    st = Stack(server, launch["prompts"], box["ref"])
    yield st
    st.client.close()


def _tokens(choice) -> list[int]:
    ids = getattr(choice, "token_ids", None)
    assert ids is not None, "server did not return token_ids"
    return list(ids)


# ------------------------------------------------------------------------------------------ start-up
def test_invalid_hip_config_exits_nonzero_with_message(launch):
    bad = launch["bad"]
    rc = bad.wait_exit(timeout=900)
    log = bad.log_text()
    assert rc != 0, log[-4000:]
    assert BAD_HIP_MESSAGE in log, log[-4000:]
    # Validated by the API server while it builds vLLM's config: no engine core was started.
    assert "EngineCore" not in log and "Engine core initialization failed" not in log, log[-4000:]


def test_health_models_and_hip_active(stack):
    assert stack.server.get("/health") == ""
    models = stack.client.models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    assert models.data[0].max_model_len == MAX_MODEL_LEN
    log = stack.server.log_text()
    # The server echoes its non-default args. (That HiP really runs shows in the long-prompt tests: their
    # tokens equal the offline HIP run's, which differ from dense attention's.)
    assert "'attention_backend': 'HIP'" in log and "'additional_config': {'hip': {" in log


# ------------------------------------------------------------------------------------------ completions
@pytest.mark.parametrize("name", ["short", "mid", "long"])
def test_completion_matches_offline(stack, name):
    r = stack.complete(name, max_tokens=32)
    assert r.choices[0].finish_reason == "length"
    assert _tokens(r.choices[0]) == stack.ref[name][:32]
    assert r.usage.completion_tokens == 32
    if name == "long":
        assert r.usage.prompt_tokens > 1000  # HiP prunes: sink 8 + window 48 + k 64 << prompt
    assert r.choices[0].text == stack.detok(stack.ref[name][:32])


def test_completion_stream_matches_offline(stack):
    stream = stack.complete("long", max_tokens=32, stream=True, stream_options={"include_usage": True})
    ids, text, finish, usage = [], [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            ids += list(getattr(c, "token_ids", None) or [])
            text.append(c.text)
            finish = c.finish_reason or finish
    assert ids == stack.ref["long"][:32]
    assert "".join(text) == stack.detok(stack.ref["long"][:32])
    assert finish == "length" and usage.completion_tokens == 32


def test_max_tokens_truncates(stack):
    r = stack.complete("p900", max_tokens=5)
    assert _tokens(r.choices[0]) == stack.ref["p900"][:5]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_stop_string(stack):
    full = stack.detok(stack.ref["long"][:32])
    # A stop string that first occurs some way into the output.
    stop = next(s for s in (stack.detok([t]).strip() for t in stack.ref["long"][6:32])
                if len(s) >= 2 and full.find(s) > 0)
    r = stack.complete("long", max_tokens=32, stop=[stop])
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full[: full.find(stop)]
    # Streaming stops at the same place.
    streamed = "".join(ch.choices[0].text for ch in stack.complete("long", max_tokens=32, stop=[stop], stream=True)
                       if ch.choices)
    assert streamed == c.text


def test_logprobs_are_greedy_and_match_offline(stack):
    r = stack.complete("long", max_tokens=16, logprobs=3)
    c = r.choices[0]
    assert _tokens(c) == stack.ref["long"][:16]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 16
    for tok, logp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert math.isfinite(logp) and logp <= 0
        assert 3 <= len(top) <= 4  # top 3 plus the sampled token when it is not among them
        assert logp == pytest.approx(max(top.values()), abs=1e-5), (tok, logp, top)  # greedy: the argmax


def test_n_greater_than_one_sampled_equals_single_seeded_requests(stack):
    """n=3 with a seed on a long (HiP-pruned) prompt: vLLM gives choice i the seed ``seed + i``, so each choice
    should equal an n=1 request with that seed (it does with dense attention, and with HiP at
    mask_refresh_interval=1). The three choices decode side by side on one cached prompt; the n=1 requests
    run alone."""
    stack.complete("long", max_tokens=1)  # cache the prompt: below, only its tail is prefilled (no chunking)
    kw = dict(max_tokens=12, temperature=0.8)
    r = stack.complete("long", n=3, seed=7, **kw)
    assert len(r.choices) == 3 and sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 36
    together = [_tokens(c) for c in sorted(r.choices, key=lambda c: c.index)]
    alone = [_tokens(stack.complete("long", seed=7 + i, **kw).choices[0]) for i in range(3)]
    assert together == alone


def test_n_greater_than_one_greedy_is_refused(stack):
    msg = _expect_400(stack.complete, "short", max_tokens=4, n=2)
    assert "n must be 1" in msg, msg


# ------------------------------------------------------------------------------------------ chat
def test_chat_prompt_is_rendered_with_given_template(stack):
    msgs = _chat_messages(stack.prompts)
    s1, via_chat = stack.post("/tokenize", {"model": SERVED_NAME, "messages": msgs, "add_generation_prompt": True})
    s2, via_text = stack.post("/tokenize", {"model": SERVED_NAME, "prompt": _render_chat(msgs),
                                            "add_special_tokens": False})
    assert s1 == s2 == 200, (via_chat, via_text)
    assert via_chat["tokens"] == via_text["tokens"]
    assert via_chat["count"] > 1000


@pytest.mark.parametrize("stream", [False, True])
def test_chat_completion_matches_offline(stack, stream):
    kw = dict(model=SERVED_NAME, messages=_chat_messages(stack.prompts), max_tokens=24, temperature=0.0,
              extra_body={"return_token_ids": True, "ignore_eos": True})
    want = stack.ref["chat"][:24]
    if not stream:
        r = stack.client.chat.completions.create(**kw)
        c = r.choices[0]
        assert c.message.role == "assistant" and c.finish_reason == "length"
        assert _tokens(c) == want
        assert c.message.content == stack.detok(want)
        assert r.usage.prompt_tokens > 1000
    else:
        ids, text = [], []
        for chunk in stack.client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                ids += list(getattr(c, "token_ids", None) or [])
                text.append(c.delta.content or "")
        assert ids == want
        assert "".join(text) == stack.detok(want)


def test_chat_logprobs(stack):
    r = stack.client.chat.completions.create(
        model=SERVED_NAME, messages=_chat_messages(stack.prompts), max_tokens=8, temperature=0.0, logprobs=True,
        top_logprobs=2, extra_body={"return_token_ids": True, "ignore_eos": True})
    c = r.choices[0]
    assert _tokens(c) == stack.ref["chat"][:8]
    assert len(c.logprobs.content) == 8
    for item in c.logprobs.content:
        assert len(item.top_logprobs) == 2
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)


# ------------------------------------------------------------------------------------------ concurrency
def test_concurrent_requests_match_offline(stack):
    """12 distinct prompts (~60 .. ~1700 tokens), 6 client threads, half of them streaming."""
    names = [f"c{i}" for i in range(12)]

    def one(i):
        name = names[i]
        if i % 2:
            ids = []
            for ch in stack.complete(name, max_tokens=24, stream=True):
                for c in ch.choices:
                    ids += list(getattr(c, "token_ids", None) or [])
            return name, ids
        return name, _tokens(stack.complete(name, max_tokens=24).choices[0])

    with ThreadPoolExecutor(max_workers=6) as pool:
        got = dict(pool.map(one, range(len(names))))
    wrong = [n for n in names if got[n] != stack.ref[n][:24]]
    assert not wrong, {n: (got[n], stack.ref[n][:24]) for n in wrong}
    stack.server.wait_idle(timeout=60)


def test_identical_concurrent_prompts_match_offline(stack):
    """The same long prompt from 3 clients at once: they share its cached prefix while decoding."""
    stack.complete("long", max_tokens=1)  # cached: the three requests below start decoding almost together
    with ThreadPoolExecutor(max_workers=3) as pool:
        got = list(pool.map(lambda _: _tokens(stack.complete("long", max_tokens=32).choices[0]), range(3)))
    assert got == [stack.ref["long"][:32]] * 3


def test_chats_sharing_a_system_prompt_decode_as_if_alone(stack):
    """Two different users, one long system prompt (several KV blocks): run together, each gets the tokens
    it gets alone. The common production case of prefix sharing."""
    system = {"role": "system", "content": stack.prompts["p900"][:2400]}  # ~650 tokens
    users = [[system, {"role": "user", "content": q}] for q in ("Who wrote Hamlet?", "Name a comedy.")]
    kw = dict(model=SERVED_NAME, max_tokens=64, temperature=0.0,  # long enough for the two to overlap
              extra_body={"return_token_ids": True, "ignore_eos": True})

    def ask(msgs):
        return _tokens(stack.client.chat.completions.create(messages=msgs, **kw).choices[0])

    alone = [ask(m) for m in users]
    with ThreadPoolExecutor(max_workers=2) as pool:
        together = list(pool.map(ask, users))
    assert together == alone


# ------------------------------------------------------------------------------------------ bad input
def _expect_400(fn, *args, **kw) -> str:
    with pytest.raises(openai.BadRequestError) as ei:
        fn(*args, **kw)
    assert ei.value.status_code == 400
    msg = str(ei.value)
    assert len(msg) > 10
    return msg


def test_bad_requests_get_400_and_server_keeps_serving(stack):
    c = stack.client.completions
    msgs = [
        _expect_400(c.create, model=SERVED_NAME, prompt=stack.prompts["overlong"], max_tokens=8),
        _expect_400(c.create, model=SERVED_NAME, prompt="", max_tokens=8),
        _expect_400(c.create, model=SERVED_NAME, prompt="Hello", max_tokens=8, temperature=-1),
        _expect_400(c.create, model=SERVED_NAME, prompt="Hello", max_tokens=0),
        _expect_400(c.create, model=SERVED_NAME, prompt="Hello", max_tokens=8, top_p=1.5),
        _expect_400(stack.client.chat.completions.create, model=SERVED_NAME,
                    messages=[{"role": "user", "content": stack.prompts["overlong"]}], max_tokens=8),
        _expect_400(stack.client.chat.completions.create, model=SERVED_NAME,
                    messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=-1),
    ]
    assert "maximum context length is 2048" in msgs[0], msgs[0]
    assert "temperature" in msgs[2], msgs[2]
    assert "max_tokens" in msgs[3], msgs[3]
    # Still serving, and still right.
    assert _tokens(stack.complete("long", max_tokens=16).choices[0]) == stack.ref["long"][:16]
    stack.server.wait_idle(timeout=60)


def test_generation_runs_to_the_context_limit(stack):
    """prompt + max_tokens over max_model_len is not an error in vLLM 0.32: generation stops at the context
    limit. HiP decodes to the last KV slot, and the first tokens still equal the offline run's."""
    r = stack.complete("c3", max_tokens=MAX_MODEL_LEN - 100)
    c = r.choices[0]
    assert c.finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == MAX_MODEL_LEN
    assert _tokens(c)[:REF_TOKENS] == stack.ref["c3"]
    stack.server.wait_idle(timeout=60)


def test_client_disconnect_mid_stream_frees_kv(stack):
    """A streaming client hangs up after 5 tokens of a request that would run ~1900 more: the request ends by
    the hang-up (it never reaches its length limit), its KV blocks are freed, and the server serves on."""
    server = stack.server
    server.wait_idle(timeout=60)
    generated = server.settled_counter("vllm:generation_tokens_total")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="EMPTY", max_retries=0, timeout=300)
    stream = client.completions.create(model=SERVED_NAME, prompt=stack.prompts["short"], max_tokens=MAX_MODEL_LEN - 100,
                                       temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    for got, _ in enumerate(stream, 1):
        if got == 5:
            break
    stream.close()
    client.close()
    idle = server.wait_idle(timeout=60)
    assert idle["kv_usage"] == 0
    # Had the hang-up been missed, the request would have generated all its MAX_MODEL_LEN - 100 tokens.
    delta = server.settled_counter("vllm:generation_tokens_total") - generated
    print(f"tokens generated around the hang-up: {delta:.0f}")
    assert delta < (MAX_MODEL_LEN - 100) // 2, f"{delta} tokens generated after a hang-up at token 5"
    assert _tokens(stack.complete("short", max_tokens=8).choices[0]) == stack.ref["short"][:8]


def _raw_stream_request(server: Server, prompt: str, max_tokens: int) -> socket.socket:
    body = json.dumps({"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "stream": True, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return s


def test_abort_during_long_prefill_keeps_other_requests_intact(stack):
    """Two requests decode while a ~1900-token prompt is being prefilled in 256-token chunks; its client
    hangs up before the first token. The two others still produce the offline tokens, and the server ends
    idle with every KV block free."""
    server = stack.server
    server.wait_idle(timeout=60)
    results: dict[str, list[int]] = {}
    decoding = {n: threading.Event() for n in ("victim_a", "victim_b")}

    def victim(name):
        ids = []
        # Longer than the reference so both are still decoding when the long prompt arrives; compared on the
        # reference's length.
        for ch in stack.complete(name, max_tokens=4 * REF_TOKENS, stream=True):
            for c in ch.choices:
                ids += list(getattr(c, "token_ids", None) or [])
            decoding[name].set()
        results[name] = ids

    threads = [threading.Thread(target=victim, args=(n,)) for n in decoding]
    for t in threads:
        t.start()
    assert all(e.wait(timeout=120) for e in decoding.values()), "the two requests never started decoding"
    sock = _raw_stream_request(server, stack.prompts["abortee"], max_tokens=64)
    try:
        # The response headers come back once the server has accepted the request and started its stream;
        # the first token follows only after ~8 prefill chunks. Hang up as soon as the headers arrive.
        sock.settimeout(60)
        early = b""
        while b"\r\n\r\n" not in early:
            part = sock.recv(1 << 16)
            if not part:
                break
            early += part
        sock.setblocking(False)
        try:
            early += sock.recv(1 << 16)
        except BlockingIOError:
            pass
        accepted = early.startswith(b"HTTP/1.1 200")
        in_prefill = accepted and b"data:" not in early
    finally:
        sock.close()  # the client hangs up
    for t in threads:
        t.join(timeout=600)
    assert accepted, early[:200]
    for name in ("victim_a", "victim_b"):
        assert results.get(name, [])[:REF_TOKENS] == stack.ref[name], name
    server.wait_idle(timeout=60)
    # The aborted prompt's blocks are reusable and nothing stale is picked up.
    assert _tokens(stack.complete("mid", max_tokens=16).choices[0]) == stack.ref["mid"][:16]
    if not in_prefill:  # everything above held, but the hang-up came after the first token: say so
        pytest.xfail("the long prompt produced a token before the hang-up (machine faster than expected)")


def test_server_idle_at_end(stack):
    stack.server.wait_idle(timeout=60)
    assert stack.server.proc.poll() is None, "server died"
