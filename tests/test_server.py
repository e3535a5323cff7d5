"""The OpenAI-compatible server, run for real: `llmcad serve` in a subprocess on 127.0.0.1
with a tiny random model, driven by the official `openai` client and by raw sockets.

The subprocess is started once for the module (importing torch costs a few seconds); its
stderr goes to a log that must hold no traceback when the module ends, and it must still
be alive. Time-limit tests use an in-process server with a short timeout.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import torch
from conftest import make_tiny_hf

from llmcad.engine import Engine
from llmcad.generate import GenerationStats
from llmcad.server import MAX_BODY_BYTES, Metrics, Queue, make_server
from tests.cgroup import minimum_budget

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-llmcad-test"
MODEL = "tiny"  # the model folder's name: the id the server gives it
CHAT = "/v1/chat/completions"
CONTEXT = 1024
QUEUE = 16
PROMPTS = ["hello world", "def add(a, b):", "The quick brown fox", "for (int i = 0;", "Bonjour le monde"]
GREEDY = {"temperature": 0}
NO_EOS = {"extra_body": {"ignore_eos": True}}


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **fields}


@dataclass
class Live:
    proc: subprocess.Popen
    port: int
    model: str
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=options.pop("api_key", KEY), max_retries=0, timeout=60, **options)

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def metrics(self) -> dict[str, float]:
        status, _, body = request(self.port, "GET", "/metrics")
        assert status == 200
        return {
            name: float(value)
            for name, value in (line.rsplit(" ", 1) for line in body.decode().splitlines() if not line.startswith("#"))
        }


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("server-model") / MODEL, "llama", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    """The same model and precision (int8) as the server, in this process, for reference answers.
    One thread: a tiny model gains nothing from more, and their spinning beside the server's
    (on a busy machine) made each token 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine.load(model, max_context=CONTEXT, progress=False)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def live(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-log") / "stderr.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"  # as for the engine above
    args = ["--port", "0", "--api-key", KEY, "--max-context", str(CONTEXT), "--queue-size", str(QUEUE), "--request-timeout", "60"]
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmcad.cli", "serve", "--target", str(model), *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    line = proc.stdout.readline().decode()
    match = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
    assert match, f"no URL printed: {line!r}\n{log.read_text()}"
    yield Live(proc, int(match.group(1)), model.name, log)
    alive = proc.poll() is None
    proc.terminate()
    proc.wait(timeout=10)
    stderr = log.read_text()
    assert alive, f"the server died:\n{stderr}"
    assert "Traceback" not in stderr, stderr


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return live.client()


def request(port: int, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None, key: str | None = KEY):
    """One HTTP request: (status, lower-cased headers, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, half_close: bool = False) -> bytes:
    """Send bytes as they are and read until the server closes the connection."""
    received = []
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(1 << 16):
                received.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(received)


def responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """Split raw bytes into (status, headers, body) responses (bodies with Content-Length)."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        assert re.fullmatch(r"HTTP/1\.[01] \d{3} .*", status_line), status_line
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        n = int(headers["content-length"])
        out.append((int(status_line.split()[1]), headers, data[:n]))
        data = data[n:]
    return out


def error_of(body: bytes) -> dict:
    """The error object of an OpenAI-shaped error body, checked for its fields' types."""
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error.keys() == {"message", "type", "param", "code"}
    return error




# ---- endpoints ---------------------------------------------------------------------------------


def test_health_and_models(live, client):
    status, _, body = request(live.port, "GET", "/health", key=None)  # open without a key
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert [m.id for m in client.models.list().data] == [live.model]
    assert client.models.retrieve(live.model).id == live.model


def test_chat_matches_the_engine(live, client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    expected = engine.chat(messages, max_tokens=12)
    answer = client.chat.completions.create(model=live.model, messages=messages, max_tokens=12, **GREEDY)
    assert answer.object == "chat.completion"
    assert answer.model == live.model
    assert len(answer.choices) == 1
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == len(engine.chat_prompt(messages))
    assert answer.usage.completion_tokens == len(expected.tokens)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def test_two_clients_alternating_get_their_own_answers(live, engine):
    """Conversations take turns on the one engine, whose prompt cache holds the last request:
    each answer equals an uncached one over its own history; a turn right after its own last
    one reuses that whole prompt, and `cache_prompt: false` reuses nothing."""
    clients = {name: live.client() for name in "ab"}
    histories = {"a": [{"role": "system", "content": "Be brief."}], "b": []}
    reused_before = live.metrics()["llmcad_prompt_tokens_reused_total"]

    def turn(name: str, text: str, **extra) -> int:
        history = histories[name]
        history.append({"role": "user", "content": text})
        answer = clients[name].chat.completions.create(model=live.model, messages=history, max_tokens=8, **GREEDY, **extra)
        expected = engine.chat(history, max_tokens=8, cache_prompt=False)
        assert answer.choices[0].message.content == expected.text, (name, text)
        history.append({"role": "assistant", "content": expected.text})
        return answer.usage.prompt_tokens_details.cached_tokens

    turn("a", PROMPTS[0])
    first_prompt = len(engine.chat_prompt(histories["a"][:-1]))
    assert turn("a", PROMPTS[1]) >= first_prompt - 1  # its own last prompt, and maybe part of its answer
    for i in range(2, 5):
        turn("b", PROMPTS[i])
        turn("a", PROMPTS[i])
    assert turn("a", PROMPTS[0], extra_body={"cache_prompt": False}) == 0
    assert live.metrics()["llmcad_prompt_tokens_reused_total"] >= reused_before + first_prompt - 1


def test_chat_streams_the_same_text_and_usage(live, client, engine):
    messages = [{"role": "user", "content": "def add(a, b):"}]
    expected = engine.chat(messages, max_tokens=20, ignore_eos=True)
    chunks = list(
        client.chat.completions.create(
            model=live.model, messages=messages, max_completion_tokens=20, stream=True,
            stream_options={"include_usage": True}, **GREEDY, **NO_EOS,
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(engine.chat_prompt(messages)), 20)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_server_sent_events_ending_with_done(live):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=60)
    body = chat_body(stream=True, **GREEDY)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    events = [e for e in response.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[-2][6:])  # no usage unless asked for
    conn.close()


def test_http_1_0_stream_ends_by_closing(live, engine):
    body = json.dumps(chat_body(stream=True, max_tokens=6, **GREEDY, ignore_eos=True)).encode()
    head = f"POST {CHAT} HTTP/1.0\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    head_out, _, stream = raw(live.port, head.encode() + body).partition(b"\r\n\r\n")
    assert head_out.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head_out and b"chunked" not in head_out
    events = [e for e in stream.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == engine.chat([{"role": "user", "content": "hello"}], max_tokens=6, ignore_eos=True).text


@pytest.mark.parametrize("as_ids", [False, True])
def test_completions_match_the_engine(live, client, engine, as_ids):
    prompt = "The quick brown fox"
    expected = engine.generate(prompt, max_tokens=10, ignore_eos=True)
    sent = engine.tokenizer.encode(prompt) if as_ids else prompt
    answer = client.completions.create(model=live.model, prompt=sent, max_tokens=10, **GREEDY, **NO_EOS)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == expected.text
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(expected.prompt_tokens), 10)

    chunks = list(
        client.completions.create(
            model=live.model, prompt=sent, max_tokens=10, stream=True, stream_options={"include_usage": True}, **GREEDY, **NO_EOS
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_strings(live, client, engine):
    prompt = "Bonjour le monde"
    full = engine.generate(prompt, max_tokens=24, ignore_eos=True)
    stop = full.text[10:12]
    assert len(stop) == 2 and stop.strip(), full.text
    cut = full.text[: full.text.find(stop)]
    for stops in (stop, ["never-generated", stop]):
        answer = client.completions.create(model=live.model, prompt=prompt, max_tokens=24, stop=stops, **GREEDY, **NO_EOS)
        assert answer.choices[0].text == cut
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage.completion_tokens < 24
    streamed = client.completions.create(model=live.model, prompt=prompt, max_tokens=24, stop=[stop], stream=True, **GREEDY, **NO_EOS)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_sampling_with_a_seed_reproduces(live, client, engine):
    options = dict(model=live.model, prompt="hello world", max_tokens=12, temperature=0.9, top_p=0.95, seed=7, **NO_EOS)
    first, again = (client.completions.create(**options).choices[0].text for _ in range(2))
    assert first == again == engine.generate("hello world", max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True).text


def test_readme_openai_example_runs(live, capsys):
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from openai import OpenAI" in b)
    substitutions = {
        '"http://127.0.0.1:8000/v1"': repr(live.base_url),
        'api_key="none"': f"api_key={KEY!r}",
        'model="qwen2.5-coder-1.5b"': f"model={live.model!r}",
    }
    for old, new in substitutions.items():
        assert old in block
        block = block.replace(old, new)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()


# ---- errors, one by one ------------------------------------------------------------------------


def test_serve_on_a_port_in_use_is_a_one_line_error(live, model):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "llmcad.cli", "serve", "--target", str(model), "--port", str(live.port)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [result.stderr.strip().splitlines()[-1]], result.stderr  # after what the engine chose, one line
    assert errors[0].startswith(f"llmcad: error: cannot listen on 127.0.0.1:{live.port}") and "Traceback" not in result.stderr

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 40
COMPLETIONS = "/v1/completions"
ERRORS = {  # case: (method, path, body, API key, status, the `param` the error names)
    "malformed JSON": ("POST", CHAT, b'{"model": "x", "messages": [', KEY, 400, None),
    "not an object": ("POST", CHAT, b"[1, 2]", KEY, 400, None),
    "invalid UTF-8": ("POST", CHAT, b'{"model": "\xff"}', KEY, 400, None),
    "missing model": ("POST", CHAT, {"messages": [{"role": "user", "content": "hi"}]}, KEY, 400, "model"),
    "missing messages": ("POST", CHAT, {"model": MODEL}, KEY, 400, "messages"),
    "messages not a list": ("POST", CHAT, chat_body(messages="hello"), KEY, 400, "messages"),
    "unknown role": ("POST", CHAT, chat_body(messages=[{"role": "robot", "content": "x"}]), KEY, 400, "messages[0].role"),
    "content not text": ("POST", CHAT, chat_body(messages=[{"role": "user", "content": 5}]), KEY, 400, "messages[0].content"),
    "max_tokens a string": ("POST", CHAT, chat_body(max_tokens="8"), KEY, 400, "max_tokens"),
    "max_tokens zero": ("POST", CHAT, chat_body(max_tokens=0), KEY, 400, "max_tokens"),
    "max_tokens a bool": ("POST", CHAT, chat_body(max_tokens=True), KEY, 400, "max_tokens"),
    "temperature out of range": ("POST", CHAT, chat_body(temperature=5), KEY, 400, "temperature"),
    "temperature NaN": ("POST", CHAT, json.dumps(chat_body(temperature=float("nan"))).encode(), KEY, 400, "temperature"),
    "top_p a string": ("POST", CHAT, chat_body(top_p="high"), KEY, 400, "top_p"),
    "seed a float": ("POST", CHAT, chat_body(seed=1.5), KEY, 400, "seed"),
    "stop a number": ("POST", CHAT, chat_body(stop=5), KEY, 400, "stop"),
    "stream not a bool": ("POST", CHAT, chat_body(stream="yes"), KEY, 400, "stream"),
    "n = 2": ("POST", CHAT, chat_body(n=2), KEY, 400, "n"),
    "logprobs": ("POST", CHAT, chat_body(logprobs=True), KEY, 400, "logprobs"),
    "prompt a number": ("POST", COMPLETIONS, {"model": MODEL, "prompt": 5}, KEY, 400, "prompt"),
    "token id out of range": ("POST", COMPLETIONS, {"model": MODEL, "prompt": [10**6]}, KEY, 400, "prompt"),
    "two prompts": ("POST", COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"]}, KEY, 400, "prompt"),
    "empty prompt": ("POST", COMPLETIONS, {"model": MODEL, "prompt": ""}, KEY, 400, "prompt"),
    "unknown model": ("POST", CHAT, chat_body(model="gpt-4o"), KEY, 404, "model"),
    "missing API key": ("POST", CHAT, chat_body(), None, 401, None),
    "wrong API key": ("POST", CHAT, chat_body(), "sk-wrong", 401, None),
    "metrics without key": ("GET", "/metrics", None, None, 401, None),
    "context exceeded": ("POST", COMPLETIONS, {"model": MODEL, "prompt": LONG_PROMPT}, KEY, 400, "max_tokens"),
    "body too large": ("POST", CHAT, b" " * (2 * MAX_BODY_BYTES), KEY, 413, None),
    "unknown endpoint": ("POST", "/v1/embeddings", chat_body(), KEY, 404, None),
    "wrong method": ("GET", CHAT, None, KEY, 405, None),
    "unknown method": ("DELETE", "/v1/models", None, KEY, 405, None),
}


@pytest.mark.parametrize("case", ERRORS)
def test_error(live, engine, case):
    method, path, body, key, expected_status, param = ERRORS[case]
    n_prompt = len(engine.tokenizer.encode(LONG_PROMPT))
    if case == "context exceeded":
        body = {**body, "max_tokens": CONTEXT - n_prompt + 1}
    status, headers, data = request(live.port, method, path, body, key=key)
    assert status == expected_status, data
    assert headers["content-type"] == "application/json"
    error = error_of(data)
    assert error["param"] == param, error
    if case == "context exceeded":
        assert error["code"] == "context_length_exceeded"
        for number in (CONTEXT, n_prompt, CONTEXT - n_prompt + 1, CONTEXT + 1):
            assert str(number) in error["message"], error["message"]
    if case == "n = 2":
        assert "'n' must be 1" in error["message"]
    if status == 401:
        assert headers["www-authenticate"] == "Bearer"
    if status == 405:
        assert headers["allow"] in ("GET", "POST")


def test_errors_reach_the_openai_client_typed(live, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="sk-wrong").models.list()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "hi"}], n=3)
    assert e.value.param == "n"


def test_body_too_large_is_refused_before_it_is_sent(live):
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {10 * MAX_BODY_BYTES}\r\nExpect: 100-continue\r\n\r\n"
    )
    [(status, _, body)] = responses(raw(live.port, head.encode()))
    assert status == 413
    assert str(10 * MAX_BODY_BYTES) in error_of(body)["message"]


def test_chunked_body_needs_content_length(live):
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
    [(status, _, body)] = responses(raw(live.port, head.encode() + b"2\r\n{}\r\n0\r\n\r\n"))
    assert status == 411
    error_of(body)


# ---- load, disconnects, fuzz -------------------------------------------------------------------


def _references(live: Live, client: openai.OpenAI) -> dict[str, str]:
    return {
        p: client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": p}], max_tokens=8, **GREEDY, **NO_EOS)
        .choices[0].message.content
        for p in PROMPTS
    }


def _load_round(live: Live, references: dict[str, str]) -> tuple[int, int, float]:
    """50 concurrent chat requests while a long generation holds the engine: QUEUE of them
    wait and are answered once it is cancelled (its client goes away), the rest get 429."""
    blocker_client, client = live.client(), live.client()
    blocker = blocker_client.chat.completions.create(
        model=live.model, messages=[{"role": "user", "content": "block"}], max_tokens=900, stream=True, **NO_EOS
    )
    next(iter(blocker))  # generating now

    def one(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        try:
            answer = client.chat.completions.create(
                model=live.model, messages=[{"role": "user", "content": prompt}], max_tokens=8, **GREEDY, **NO_EOS
            )
        except openai.RateLimitError as e:
            return 429, e.response.headers.get("retry-after")
        assert answer.choices[0].message.content == references[prompt]  # nobody else's output
        return 200, None

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=50) as pool:
        futures = [pool.submit(one, i) for i in range(50)]
        deadline = time.monotonic() + 30
        while sum(f.done() for f in futures) < 50 - QUEUE and time.monotonic() < deadline:
            time.sleep(0.02)
        blocker.close()
        done, _ = wait(futures, timeout=60)
    elapsed = time.perf_counter() - start
    blocker_client.close()
    client.close()
    outcomes = [f.result() for f in futures]
    assert len(done) == 50
    completed = sum(status == 200 for status, _ in outcomes)
    rejected = [retry for status, retry in outcomes if status == 429]
    assert completed + len(rejected) == 50
    assert all(retry is not None and int(retry) >= 1 for retry in rejected)
    return completed, len(rejected), elapsed


def test_fifty_concurrent_requests_twice(live, client):
    references = _references(live, client)
    figures = []
    for _ in range(2):
        completed, rejected, elapsed = _load_round(live, references)
        assert (completed, rejected) == (QUEUE, 50 - QUEUE)
        assert request(live.port, "GET", "/health", key=None)[0] == 200
        figures.append((completed, rejected, elapsed, live.rss_bytes()))
    growth = figures[1][3] - figures[0][3]
    print(f"\nload rounds (completed, 429, seconds, RSS bytes): {figures}; RSS growth {growth / 2**20:.1f} MiB")
    assert growth < 8 * 2**20, figures  # the second round keeps nothing (measured: under 2 MiB)
    metrics = live.metrics()
    assert metrics['llmcad_requests_total{endpoint="/v1/chat/completions",status="429"}'] >= 2 * (50 - QUEUE)
    assert metrics["llmcad_queue_depth"] == 0


def _next_request_latency(client: openai.OpenAI, live: Live) -> float:
    start = time.perf_counter()
    client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    return time.perf_counter() - start


def test_disconnect_mid_stream_cancels_the_generation(live, client):
    before = live.metrics()
    stream = live.client().chat.completions.create(
        model=live.model, messages=[{"role": "user", "content": "long"}], max_tokens=900, stream=True, **NO_EOS
    )
    chunks = iter(stream)
    for _ in range(4):
        next(chunks)
    stream.close()
    latency = _next_request_latency(client, live)
    print(f"\nnext request after a mid-stream disconnect: {latency * 1000:.0f} ms")
    assert latency < 1.0
    after = live.metrics()
    assert after['llmcad_cancelled_total{reason="disconnect"}'] == before.get('llmcad_cancelled_total{reason="disconnect"}', 0) + 1
    assert after["llmcad_generated_tokens_total"] - before["llmcad_generated_tokens_total"] < 200


def test_disconnect_while_waiting_for_a_whole_answer_cancels_it(live, client):
    before = live.metrics()
    body = json.dumps(chat_body(max_tokens=900, ignore_eos=True)).encode()
    head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(head.encode() + body)
        time.sleep(0.5)
    latency = _next_request_latency(client, live)
    print(f"\nnext request after a disconnect from a non-streaming request: {latency * 1000:.0f} ms")
    assert latency < 1.0
    after = live.metrics()
    assert after['llmcad_cancelled_total{reason="disconnect"}'] == before.get('llmcad_cancelled_total{reason="disconnect"}', 0) + 1


def _fuzz_cases(live: Live, rng: random.Random) -> list[tuple[bytes, bool]]:
    """(request bytes, half-close after sending) for malformed bodies and headers."""
    valid = {"model": live.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bad_values = {
        "model": [1, None, [], {}, "no-such-model", ""],
        "messages": ["hi", [], [1], [{"role": "robot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": [{"type": "image_url"}]}], {}, None],
        "max_tokens": ["8", -1, 0, 1.5, True, 10**12, [], {}],
        "temperature": ["0", -1, 3, True, [], {}],
        "top_p": [0, 2, "x", -0.5],
        "seed": [1.5, "s", 2**70, []],
        "stop": [5, [1], ["a"] * 17, {}, [None], "a" * 257],
        "n": [2, 0, "1", 1.5],
        "stream": ["yes", 1, [], {}],
        "stream_options": ["x", 1, []],
        "logprobs": [True, 5],
    }
    cases: list[tuple[bytes, bool]] = []

    def post(body: bytes, path: str = CHAT, extra: str = "", length: int | None = None, half_close: bool = False) -> None:
        n = len(body) if length is None else length
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\nContent-Length: {n}\r\n{extra}\r\n"
        cases.append((head.encode() + body, half_close))

    text = json.dumps(valid, separators=(",", ":")).encode()
    for _ in range(60):  # a strict prefix of an object is never JSON
        post(text[: rng.randrange(len(text))])
    for _ in range(60):  # a control character or a byte that is not UTF-8, anywhere
        i = rng.randrange(len(text) + 1)
        post(text[:i] + bytes([rng.choice([*range(0, 9), 11, 12, *range(14, 32), 0xC0, 0xFF, 0x80])]) + text[i:])
    for field, values in bad_values.items():  # each field with a value of the wrong type or range
        for value in values:
            post(json.dumps({**valid, field: value}).encode())
    for field in ("model", "messages"):
        post(json.dumps({k: v for k, v in valid.items() if k != field}).encode())
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 5000):
        post(b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"temperature":%s}' % (live.model.encode(), literal))
    for body in (b"[]", b'"x"', b"1", b"null", b"", b"{" * 100000, b"[" * 100000, b'{"model":"\\ud800"}'):
        post(body)
    for prompt in (5, [[1, 2], [3]], [-1], [10**9], ["a", "b"], {}, None, "", [True]):
        post(json.dumps({"model": live.model, "prompt": prompt}).encode(), "/v1/completions")
    # headers
    for length in ("abc", "-1", "1e3", "+5", "²", "9" * 30):
        cases.append((f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\nContent-Length: {length}\r\n\r\n{{}}".encode("latin-1"), True))
    post(text, extra=f"Content-Length: {len(text) + 1}\r\n")  # two different lengths
    post(text, length=len(text) + 50, half_close=True)  # shorter than announced
    post(text, length=len(text) - 3)  # longer than announced: the rest is not a request
    post(b"x" * 100, length=10**15)
    for auth in ("", "Bearer", "Bearer sk-wrong", "Basic c2stbGxtY2FkLXRlc3Q=", "Bearer " + "k" * 10000, "Bearer \xff\xfe"):
        head = f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\nContent-Length: {len(text)}\r\n\r\n"
        cases.append((head.encode("latin-1") + text, False))
    cases.append((f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n".encode(), False))
    cases.append((f"GET /{'a' * 70000} HTTP/1.1\r\n\r\n".encode(), False))  # request line too long
    cases.append((f"GET /health HTTP/1.1\r\nX: {'a' * 70000}\r\n\r\n".encode(), False))  # header line too long
    cases.append((("GET /health HTTP/1.1\r\n" + "X: y\r\n" * 120 + "\r\n").encode(), False))  # too many headers
    for line in ("GET /health", "GET /health HTTP/1.x", "GET /health FOO/1.1", "POST /v1/completions", "G E T / H", "BREW /pot HTTP/1.1", "GET /../../etc/passwd HTTP/1.1", "GET http://x/v1/nothing HTTP/1.1"):
        cases.append((f"{line}\r\nConnection: close\r\n\r\n".encode(), False))
    for _ in range(40):  # random bytes as a request line
        junk = bytes(rng.choice([b for b in range(1, 256) if b not in (10, 13)]) for _ in range(rng.randrange(8, 200)))
        cases.append((b"X" + junk + b"\r\n\r\n", False))
    return cases


def test_fuzz_gets_only_clean_client_errors(live, client):
    cases = _fuzz_cases(live, random.Random(6))
    assert len(cases) >= 250
    statuses = []
    for data, half_close in cases:
        answers = responses(raw(live.port, data, half_close))
        assert answers, data[:200]
        for status, headers, body in answers:
            assert 400 <= status < 500, (status, data[:200], body)
            assert headers["content-type"] == "application/json"
            error_of(body)
            statuses.append(status)
    print(f"\nfuzz: {len(cases)} requests, statuses {sorted(set(statuses))}")
    assert request(live.port, "GET", "/health", key=None)[0] == 200
    assert client.chat.completions.create(model=live.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2).choices


# ---- time limits (an in-process server with a half-second request timeout) -----------------------


@pytest.fixture
def local(engine):
    server = make_server(engine, "127.0.0.1", 0, request_timeout=0.5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_generation_past_the_time_limit_ends_with_length(local, engine):
    port = local.server_address[1]
    body = {"model": engine.name, "prompt": "hello", "max_tokens": 1000, "ignore_eos": True, **GREEDY}
    start = time.perf_counter()
    status, _, data = request(port, "POST", "/v1/completions", body)
    elapsed = time.perf_counter() - start
    answer = json.loads(data)
    assert status == 200
    assert answer["choices"][0]["finish_reason"] == "length"
    assert 0 < answer["usage"]["completion_tokens"] < 1000
    assert 0.5 <= elapsed < 2.0


def test_waiting_past_the_time_limit_is_503(local, engine):
    port = local.server_address[1]
    with local.queue.turn(time.monotonic() + 10, lambda: False):  # the engine stays busy
        status, headers, data = request(port, "POST", "/v1/completions", {"model": engine.name, "prompt": "hello"})
    assert status == 503
    assert int(headers["retry-after"]) >= 1
    assert error_of(data)["code"] == "queue_timeout"


def test_closing_ends_the_running_generation_and_refuses_the_queued(engine):
    """server_close() answers the waiting request 503, ends the running stream as its deadline
    would (finish_reason "length", then [DONE]) and returns once every connection's thread has
    ended, without waiting out an idle kept-alive connection."""

    class Slow:  # the engine at 20 pieces a second: the generation is surely under way when closing
        def __getattr__(self, name):
            return getattr(engine, name)

        def stream(self, *args, **options):
            for piece in engine.stream(*args, **options):
                time.sleep(0.05)
                yield piece

    server = make_server(Slow(), "127.0.0.1", 0, model_ids=[engine.name])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    body = {"model": engine.name, "prompt": "hello", "max_tokens": 1000, "ignore_eos": True, "stream": True, **GREEDY}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    stream = conn.getresponse()
    assert stream.status == 200 and stream.readline().startswith(b"data: ")  # generating
    idle = socket.create_connection(("127.0.0.1", port))  # a kept-alive connection with no request
    waiting: list[tuple[int, bytes]] = []
    waiter = threading.Thread(target=lambda: waiting.append(request(port, "POST", "/v1/completions", {"model": engine.name, "prompt": "hi"})[::2]))
    waiter.start()
    while server.queue.depth == 0:
        time.sleep(0.01)
    server.shutdown()
    start = time.perf_counter()
    server.server_close()
    assert time.perf_counter() - start < 2.0  # the idle connection did not hold it up
    assert not server.queue.busy
    assert not [t for t in threading.enumerate() if "process_request_thread" in t.name]  # every connection's thread ended
    idle.close()
    waiter.join(timeout=10)
    assert waiting[0][0] == 503 and error_of(waiting[0][1])["code"] == "shutting_down"
    events = [line[6:] for line in stream.read().split(b"\n") if line.startswith(b"data: ")]
    conn.close()
    assert events[-1] == b"[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert 'llmcad_cancelled_total{reason="shutdown"} 1' in server.metrics.render(server.queue)


# ---- metrics of speculative decoding ------------------------------------------------------------


def test_metrics_report_verifications_with_a_draft(model, tmp_path):
    """With the target as its own draft, /metrics counts verifications and accepted tokens
    as the engine's stats do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine.load(model, draft=model, mode="tree", precision="fp32", draft_precision="fp32", max_context=CONTEXT, progress=False)  # fixed limits: llmcad learns between the two generations
        server = make_server(engine, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.server_address[1]
        body = {"model": engine.name, "prompt": "hello", "max_tokens": 24, "ignore_eos": True, **GREEDY}
        status, _, data = request(port, "POST", "/v1/completions", body)
        assert status == 200
        expected = engine.generate("hello", max_tokens=24, ignore_eos=True)
        assert json.loads(data)["choices"][0]["text"] == expected.text
        status, _, text = request(port, "GET", "/metrics")
        server.shutdown()
        server.server_close()
    finally:
        torch.set_num_threads(threads)
    metrics = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if not line.startswith("#"))
    verifications = int(metrics["llmcad_verifications_total"])
    assert verifications == expected.stats.extra["verifications"] > 0
    per_verification = float(metrics["llmcad_accepted_tokens_per_verification"])
    assert per_verification == pytest.approx(expected.stats.extra["accepted_per_verification"])
    assert int(metrics["llmcad_accepted_tokens_total"]) == round(per_verification * verifications)
    assert metrics["llmcad_bytes_streamed_total"] == "0"  # everything resident: nothing streamed


def test_metrics_sum_bytes_read_when_the_engine_reports_them():
    metrics, queue = Metrics(), Queue(4)
    assert "llmcad_bytes_streamed_total" not in metrics.render(queue)
    for n in (1000, 2500):
        metrics.generation(3, 5, 0.1, GenerationStats(prompt_tokens=3, new_tokens=5, extra={"bytes_read": n}), None)
    metrics.generation(3, 2, 0.1, None, "disconnect")
    text = metrics.render(queue)
    assert "\nllmcad_bytes_streamed_total 3500\n" in text
    assert "\nllmcad_generated_tokens_total 12\n" in text
    assert '\nllmcad_cancelled_total{reason="disconnect"} 1\n' in text


# ---- a real model, streamed under a memory budget, with a draft ----------------------------------


def test_serve_streams_a_real_target_under_a_budget_with_a_draft(smollm2):
    """`llmcad serve --draft --memory-budget`: the plan is printed, the target is streamed
    (bytes in /metrics), the greedy answer is the target's own, and Ctrl-C in the middle of
    a second answer ends that answer and then the server cleanly."""
    options = ["--target", str(smollm2), "--draft", str(smollm2), "--max-context", str(CONTEXT)]
    budget = minimum_budget(options) + 10 * 2**20  # a few resident layers: most of the target streams
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmcad.cli", "serve", *options, "--memory-budget", str(budget), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal, even under a shell that ignores it
    )
    try:
        line = proc.stdout.readline().decode()
        url = re.search(r"at (http://127\.0\.0\.1:(\d+)/v1)", line)
        assert url, line
        port = int(url.group(2))
        messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
        client = openai.OpenAI(base_url=url.group(1), api_key="none", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model=smollm2.name, messages=messages, max_tokens=24, **GREEDY, **NO_EOS)
        client.close()
        status, _, body = request(port, "GET", "/metrics", key=None)
        assert status == 200
        client = openai.OpenAI(base_url=url.group(1), api_key="none", max_retries=0, timeout=120)
        chunks = iter(client.chat.completions.create(model=smollm2.name, messages=messages, max_tokens=900, stream=True, **GREEDY, **NO_EOS))
        next(chunks)  # the second answer is under way
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    proc.send_signal(signal.SIGINT)
    last = list(chunks)[-1]
    client.close()
    _, stderr = proc.communicate(timeout=60)
    stderr = stderr.decode()
    assert last.choices[0].finish_reason == "length"
    assert proc.returncode == 130 and stderr.rstrip().endswith("llmcad: interrupted"), stderr[-2000:]  # not an abort
    assert "Traceback" not in stderr, stderr
    assert f"memory plan (budget {budget >> 20} MB" in stderr
    per_pass_mb = int(re.search(r"streamed per pass\s+(\d+) MB", stderr).group(1))
    assert per_pass_mb > 50

    metrics = dict(line.rsplit(" ", 1) for line in body.decode().splitlines() if not line.startswith("#"))
    verifications = int(metrics["llmcad_verifications_total"])
    assert verifications > 0
    assert int(metrics["llmcad_bytes_streamed_total"]) >= verifications * (per_pass_mb - 1) * 2**20

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Engine.load(smollm2, max_context=CONTEXT, progress=False) as alone:  # the target alone, resident
            expected = alone.generate(alone.chat_prompt(messages), max_tokens=24, ignore_eos=True, temperature=0)
    finally:
        torch.set_num_threads(threads)
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.completion_tokens == len(expected.tokens) == 24
