"""An OpenAI-compatible HTTP server over one Engine, on the standard library alone.

One generation runs at a time. Requests wait their turn in a bounded FIFO queue; when it
is full the answer is 429 with Retry-After. Every request has a deadline (the request
timeout, counted from its arrival): reached while queued, the answer is 503; reached while
generating, the generation stops and ends with finish_reason "length". A client that goes
away (a write to it fails, or its socket shows end-of-file, polled between engine steps and
while it waits in the queue) gives up its place or ends its generation at the next step.
Closing the server (Ctrl-C on `llmcad serve`) answers the queued requests 503, ends the
running generation at its next step as its deadline would, and waits for every connection's
thread to end: none is left running (even freeing tensors) when the engine closes and the
interpreter exits, which kills such a thread inside PyTorch and aborts the process.
Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llmcad.engine import Engine
from llmcad.errors import LlmcadError
from llmcad.generate import GenerationStats

MAX_BODY_BYTES = 1 << 20
SOCKET_TIMEOUT_S = 30.0  # a client that neither sends nor reads for this long is dropped
KEEP_ALIVE_S = 5.0  # an idle connection (and its thread) is closed after this long without a request
QUEUE_POLL_S = 0.25  # how often a queued request checks that its client is still there
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # text that may begin a stop string is held back and rescanned each step
CHAT_ROLES = ("system", "developer", "user", "assistant")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ENDPOINTS = {
    "/health": "GET",
    "/metrics": "GET",
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
}


class ApiError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ClientGone(Exception):
    """The client closed its connection; nothing more can be sent to it."""


# ---- request validation ------------------------------------------------------------------


@dataclass
class Job:
    """A validated generation request."""

    chat: bool  # /v1/chat/completions, else /v1/completions
    prompt: list[int]
    options: dict[str, Any]  # keyword arguments for Engine.stream
    stream: bool
    include_usage: bool


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(body: dict, name: str, default: Any, low: float, high: float, integer: bool = False) -> Any:
    """body[name] (None or absent: `default`), a finite number (bool excluded) in [low, high]."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind}, got {_show(value)}", param=name, code="invalid_type")
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name, code="invalid_value")
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be a boolean, got {_show(value)}", param=name, code="invalid_type")
    return value


def _refuse_unsupported(body: dict) -> None:
    """Options whose meaning this server cannot honour are refused, not silently ignored."""
    n = _number(body, "n", 1, 1, 128, integer=True)
    if n != 1:
        raise ApiError(400, f"'n' must be 1: this server generates one choice per request (got {n})", param="n", code="unsupported_value")
    best_of = _number(body, "best_of", 1, 1, 128, integer=True)
    if best_of != 1:
        raise ApiError(400, "'best_of' must be 1", param="best_of", code="unsupported_value")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions"):
        if body.get(name) not in (None, False, 0, "", []):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "'response_format' other than text is not supported", param="response_format", code="unsupported_parameter")


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if isinstance(stops, list) and len(stops) <= MAX_STOP_STRINGS and all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stops):
        return stops
    raise ApiError(
        400,
        f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
        param="stop",
        code="invalid_value",
    )


def _message_text(content: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
        raise ApiError(400, f"'{param}' may hold only text parts ({{\"type\": \"text\", \"text\": ...}})", param=param, code="unsupported_value")
    raise ApiError(400, f"'{param}' must be a string or a list of text parts, got {_show(content)}", param=param, code="invalid_type")


def _chat_prompt(body: dict, engine: Engine) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of messages", param="messages", code="invalid_type")
    rendered = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"'{param}' must be an object with 'role' and 'content'", param=param, code="invalid_type")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"'{param}.role' must be one of {', '.join(CHAT_ROLES)}, got {_show(role)}", param=f"{param}.role", code="invalid_value")
        content = message.get("content")
        text = "" if content is None and role == "assistant" else _message_text(content, f"{param}.content")
        rendered.append({"role": "system" if role == "developer" else role, "content": text})
    return engine.chat_prompt(rendered)


def _completion_prompt(body: dict, engine: Engine) -> list[int]:
    """A string, or token ids; a list of one of either (one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.tokenizer.encode(prompt)
    vocab = engine.model.config.vocab_size
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if all(0 <= t < vocab for t in prompt):
            return prompt
        raise ApiError(400, f"'prompt' token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt", code="invalid_type")


def parse_job(body: dict, engine: Engine, chat: bool, model_ids: list[str]) -> Job:
    """Validate a request body for /v1/chat/completions (`chat`) or /v1/completions."""
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string naming a model from /v1/models", param="model", code="invalid_type")
    if model not in model_ids:
        raise ApiError(404, f"The model '{model}' does not exist; this server has {', '.join(model_ids)}", param="model", code="model_not_found")
    _refuse_unsupported(body)
    prompt = _chat_prompt(body, engine) if chat else _completion_prompt(body, engine)
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt", code="invalid_value")
    room = engine.max_context - len(prompt)
    max_tokens = _number(body, "max_tokens", None, 1, 2**31, integer=True)
    max_tokens = _number(body, "max_completion_tokens", max_tokens, 1, 2**31, integer=True)
    if max_tokens is None:
        max_tokens = max(room, 1) if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
    if max_tokens > room:
        raise ApiError(
            400,
            f"This model's maximum context length is {engine.max_context} tokens. However, you requested "
            f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the completion). "
            "Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stream = _flag(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    options = dict(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, 0, 2**31, integer=True),  # extension, as llama.cpp and vLLM
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=_stop(body),
        ignore_eos=_flag(body, "ignore_eos"),  # extension, as llama.cpp and vLLM
        # extension, as llama.cpp: reuse the keys and values of the last request's prompt and answer
        cache_prompt=_flag(body, "cache_prompt", True),
    )
    if options["top_p"] == 0:
        raise ApiError(400, "'top_p' must be greater than 0", param="top_p", code="invalid_value")
    include_usage = stream and _flag(stream_options or {}, "include_usage")
    return Job(chat, prompt, options, stream, include_usage)


# ---- the queue and the metrics -------------------------------------------------------------


class Queue:
    """One generation at a time, in arrival order; at most `size` requests wait."""

    def __init__(self, size: int):
        self.size = size
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._busy = self._closed = False
        self._mean_s = 1.0  # moving average of a generation's duration, for Retry-After

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Refuse new turns, answer the waiting ones 503, and wait until the running
        generation (which sees `closed` at its next step) gives its turn back."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._busy:
                self._cond.wait()

    @contextmanager
    def turn(self, deadline: float, gone: Callable[[], bool]) -> Iterator[None]:
        """Wait for this request's turn (until `deadline`, on time.monotonic), then hold it."""
        with self._cond:
            if (self._busy or self._waiting) and len(self._waiting) >= self.size:
                raise ApiError(
                    429,
                    f"The server is busy: {len(self._waiting)} requests are already waiting. Retry later.",
                    type="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(self._retry_after())},
                )
            ticket = object()
            self._waiting.append(ticket)
            try:
                while not self._closed and (self._busy or self._waiting[0] is not ticket):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ApiError(
                            503,
                            "The request timed out waiting for its turn. Retry later.",
                            code="queue_timeout",
                            headers={"Retry-After": str(self._retry_after())},
                        )
                    self._cond.wait(min(left, QUEUE_POLL_S))
                    if gone():
                        raise ClientGone
                if self._closed:
                    raise ApiError(503, "The server is shutting down.", code="shutting_down")
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()
            self._busy = True
        start = time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - start)
                self._cond.notify_all()

    def _retry_after(self) -> int:
        """Seconds until the requests waiting now have likely been served (from the mean
        generation time), from 1 to 60."""
        return max(1, min(60, math.ceil(self._mean_s * (len(self._waiting) + 1))))


class Metrics:
    """Counters for /metrics, in Prometheus' text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.cancelled: Counter[str] = Counter()
        self.prompt_tokens = self.completion_tokens = self.prompt_tokens_reused = 0
        self.generation_s = 0.0
        self.last_tokens_per_s = 0.0
        self.verifications = self.accepted_tokens = 0
        self.last_accepted_per_verification: float | None = None
        self.bytes_read: int | None = None  # target weights streamed from storage, when the engine reports it

    def request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests[path if path in ENDPOINTS else "other", status] += 1

    def generation(
        self, prompt_tokens: int, completion_tokens: int, seconds: float, stats: GenerationStats | None, cancelled: str | None
    ) -> None:
        with self._lock:
            if cancelled:
                self.cancelled[cancelled] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.generation_s += seconds
            if stats is None:
                return
            self.last_tokens_per_s = stats.decode_tokens_per_s
            extra = stats.extra
            self.prompt_tokens_reused += int(extra.get("prompt_tokens_reused", 0))
            if "verifications" in extra:
                self.verifications += int(extra["verifications"])
                self.accepted_tokens += round(extra["accepted_per_verification"] * extra["verifications"])
                self.last_accepted_per_verification = float(extra["accepted_per_verification"])
            if "bytes_read" in extra:
                self.bytes_read = (self.bytes_read or 0) + int(extra["bytes_read"])

    def render(self, queue: Queue) -> str:
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
                lines.extend((f"# HELP {name} {help}", f"# TYPE {name} {kind}"))
                lines.extend(f"{name}{labels} {value}" for labels, value in samples)

            metric("llmcad_requests_total", "counter", "HTTP requests answered, by endpoint and status.", [
                (f'{{endpoint="{path}",status="{status}"}}', n) for (path, status), n in sorted(self.requests.items())
            ])
            metric("llmcad_cancelled_total", "counter", "Generations ended early, by reason (disconnect, timeout, shutdown).", [
                (f'{{reason="{reason}"}}', n) for reason, n in sorted(self.cancelled.items())
            ])
            metric("llmcad_prompt_tokens_total", "counter", "Prompt tokens processed.", [("", self.prompt_tokens)])
            metric("llmcad_prompt_tokens_reused_total", "counter", "Prompt tokens whose keys and values were kept from the last request (completed generations).", [("", self.prompt_tokens_reused)])
            metric("llmcad_generated_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)])
            metric("llmcad_generation_seconds_total", "counter", "Time spent generating.", [("", self.generation_s)])
            metric("llmcad_decode_tokens_per_second", "gauge", "Decode speed of the last completed generation.", [("", self.last_tokens_per_s)])
            metric("llmcad_verifications_total", "counter", "Speculative verification passes of the target.", [("", self.verifications)])
            metric("llmcad_accepted_tokens_total", "counter", "Drafted tokens the target accepted.", [("", self.accepted_tokens)])
            if self.last_accepted_per_verification is not None:
                metric("llmcad_accepted_tokens_per_verification", "gauge", "Accepted drafted tokens per verification in the last generation.", [("", self.last_accepted_per_verification)])
            if self.bytes_read is not None:
                metric("llmcad_bytes_streamed_total", "counter", "Target weight bytes streamed from storage.", [("", self.bytes_read)])
            metric("llmcad_queue_depth", "gauge", "Requests waiting for their turn.", [("", queue.depth)])
            metric("llmcad_generating", "gauge", "1 while a generation runs.", [("", int(queue.busy))])
            rss = _resident_bytes()
            if rss is not None:
                metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", [("", rss)])
            return "\n".join(lines) + "\n"


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# ---- HTTP ------------------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    """The HTTP server: one thread per connection, one engine, one generation at a time."""

    daemon_threads = False  # server_close joins the connections' threads
    request_queue_size = 128  # listen backlog: bursts of connections are accepted, then queued or refused

    def __init__(
        self,
        engine: Engine,
        address: tuple[str, int],
        *,
        model_ids: list[str],
        api_key: str | None = None,
        queue_size: int = 16,
        request_timeout: float = 600.0,
    ):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.engine, self.model_ids, self.api_key = engine, model_ids, api_key
        self.queue, self.metrics = Queue(queue_size), Metrics()  # before binding: a failed bind calls server_close
        self.request_timeout = request_timeout
        self.started = int(time.time())
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def process_request(self, request: socket.socket, client_address) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        """Stop listening, end the running generation at its next step, then wait for every
        connection's thread (see the module's docstring)."""
        self.socket.close()
        if self.queue.busy:
            print("llmcad: stopping: the running generation ends at its next step", file=sys.stderr, flush=True)
        self.queue.close()
        with self._connections_lock:
            for connection in self._connections:  # one waiting for its next request ends now
                try:
                    connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
        super().server_close()  # joins the threads

    def handle_error(self, request, client_address) -> None:
        """A client that vanished is routine; anything else is a bug worth a traceback."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        traceback.print_exc()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S
    server: Server

    def version_string(self) -> str:
        return "llmcad"

    # -- http.server hooks: its own errors in our shape, unknown methods 405, no HTTP/0.9

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if self.request_version == "HTTP/0.9":  # always answer with a status line
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        try:
            self._send_json(code, ApiError(code, message or HTTPStatus(code).phrase).body())
        except ClientGone:
            pass

    def handle_one_request(self) -> None:
        self.connection.settimeout(KEEP_ALIVE_S)  # waiting for the request line
        super().handle_one_request()

    def parse_request(self) -> bool:
        self.connection.settimeout(SOCKET_TIMEOUT_S)
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 is not supported")
            return False
        return True

    def handle_expect_100(self) -> bool:
        if self._content_length() > MAX_BODY_BYTES:  # refuse before the client sends the body
            self.send_error(413, self._too_large())
            return False
        return super().handle_expect_100()

    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._method_not_allowed
        raise AttributeError(name)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.server.metrics.request(self._path(), int(code) if isinstance(code, int) else 0)
        super().log_request(code, size)

    # -- endpoints

    def do_GET(self) -> None:
        self._answer(self._get)

    def do_POST(self) -> None:
        self._answer(self._post)

    def _method_not_allowed(self) -> None:
        self._answer(lambda: self._route(self._path(), self.command))

    def _get(self) -> None:
        path, s = self._path(), self.server
        if path == "/health":
            return self._send_json(200, {"status": "ok"})
        self._route(path, "GET")
        self._authorize()
        if path == "/metrics":
            return self._send(200, s.metrics.render(s.queue).encode(), "text/plain; version=0.0.4; charset=utf-8")
        models = [{"id": m, "object": "model", "created": s.started, "owned_by": "llmcad"} for m in s.model_ids]
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": models})
        model = next(m for m in models if path == f"/v1/models/{m['id']}")
        self._send_json(200, model)

    def _post(self) -> None:
        path = self._path()
        self._route(path, "POST")
        self._authorize()
        body = self._read_json()
        job = parse_job(body, self.server.engine, path == "/v1/chat/completions", self.server.model_ids)
        self._run(job, body["model"])

    def _route(self, path: str, method: str) -> None:
        known = {**ENDPOINTS, **{f"/v1/models/{m}": "GET" for m in self.server.model_ids}}
        if path not in known:
            raise ApiError(404, f"Invalid URL ({self.command} {path})", code="unknown_url")
        if known[path] != method:
            raise ApiError(405, f"{method} is not allowed here (use {known[path]})", headers={"Allow": known[path]})

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            problem = "Incorrect API key provided." if token else "Missing API key: send 'Authorization: Bearer KEY'."
            raise ApiError(401, problem, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # -- generation

    def _run(self, job: Job, model: str) -> None:
        s = self.server
        arrived = time.monotonic()
        with s.queue.turn(arrived + s.request_timeout, self._client_gone):
            pieces = s.engine.stream(job.prompt, **job.options)  # a bad option raises LlmcadError: 400
            start = time.monotonic()
            tokens, finish, stats, outcome = 0, "length", None, None
            try:
                writer = _Writer(self, job, model)
                for piece in pieces:
                    tokens += len(piece.token_ids)
                    writer.text(piece.text)
                    if piece.finish_reason:
                        finish, stats = piece.finish_reason, piece.stats
                    elif self._client_gone():
                        raise ClientGone
                    elif time.monotonic() - arrived > s.request_timeout:
                        outcome = "timeout"
                        break
                    elif s.queue.closed:
                        outcome = "shutdown"
                        break
            except ClientGone:
                outcome = "disconnect"
                raise
            finally:
                pieces.close()
                s.metrics.generation(len(job.prompt), tokens, time.monotonic() - start, stats, outcome)
        cached = int(stats.extra.get("prompt_tokens_reused", 0)) if stats is not None else 0
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": tokens, "total_tokens": len(job.prompt) + tokens}
        writer.finish(finish, {**usage, "prompt_tokens_details": {"cached_tokens": cached}})

    def _client_gone(self) -> bool:
        """True when the client has closed its end. Data it sent ahead (a pipelined request)
        stays unread; only end-of-file or a reset counts."""
        try:
            poller = select.poll()
            poller.register(self.connection, select.POLLIN)
            if not poller.poll(0):
                return False
            return not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    # -- plumbing

    def _answer(self, handler: Callable[[], None]) -> None:
        """Run `handler`; an ApiError becomes its answer, a vanished client ends the
        connection, and anything else is a 500 (with a traceback in the log)."""
        self._body_read = False
        self._streaming = False
        try:
            handler()
        except ClientGone:
            self.close_connection = True
            if not self._streaming:  # nothing was answered: count it as nginx does, "client closed request"
                self.server.metrics.request(self._path(), 499)
        except Exception as e:
            if isinstance(e, LlmcadError):
                e = ApiError(400, str(e))
            elif not isinstance(e, ApiError):
                traceback.print_exc()
                e = ApiError(500, "internal server error")
            self._send_error(e)

    def _send_error(self, error: ApiError) -> None:
        if self._streaming:  # mid-stream: an error event ends the stream
            try:
                _Writer.event(self, error.body())
                self._stream_end()
            except ClientGone:
                self.close_connection = True
            return
        self.close_connection |= not self._body_read  # unread body bytes must not pass for the next request
        try:
            self._send_json(error.status, error.body(), error.headers)
        except ClientGone:
            return
        if not self._body_read:
            self._drain()

    def _path(self) -> str:
        return (getattr(self, "path", "") or "").split("?", 1)[0]

    def _content_length(self) -> int:
        """The one Content-Length header's value; -1 when it is missing, repeated or not a number."""
        values = [v.strip() for v in self.headers.get_all("Content-Length", [])]
        ok = len(values) == 1 and values[0].isascii() and values[0].isdigit() and len(values[0]) <= 18
        return int(values[0]) if ok else -1

    def _too_large(self) -> str:
        return f"The request body is {self._content_length()} bytes; the limit is {MAX_BODY_BYTES} bytes."

    def _read_json(self) -> dict:
        if "Transfer-Encoding" in self.headers:
            raise ApiError(411, "Send the body with a Content-Length header (no Transfer-Encoding).")
        n = self._content_length()
        if n < 0:
            raise ApiError(411 if "Content-Length" not in self.headers else 400, "A valid Content-Length header is required.")
        if n > MAX_BODY_BYTES:
            raise ApiError(413, self._too_large(), code="body_too_large")
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raise ApiError(408, "Timed out reading the request body.") from None
        self._body_read = True
        if len(raw) < n:
            self.close_connection = True
            raise ApiError(400, f"The body ended after {len(raw)} of {n} bytes.")
        try:
            body = json.loads(raw)
            json.dumps(body, ensure_ascii=False).encode()  # rejects unpaired surrogates ("\ud800")
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"The body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
        return body

    def _drain(self) -> None:
        """Read and drop a body we will not use (up to a bound), so that closing the
        connection does not reset it before the client has read our answer."""
        left = min(self._content_length(), 16 * MAX_BODY_BYTES)
        end = time.monotonic() + 2.0
        try:
            self.connection.settimeout(1.0)
            while left > 0 and time.monotonic() < end:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _send_json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            self.wfile.write(data)
        except OSError as e:
            raise ClientGone from e

    def _stream_start(self) -> None:
        """Headers of a server-sent event stream: chunked for HTTP/1.1 (the connection stays
        open for the next request), ended by closing the connection for HTTP/1.0."""
        self._chunked = self.request_version == "HTTP/1.1"
        self.close_connection |= not self._chunked
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding" if self._chunked else "Connection", "chunked" if self._chunked else "close")
        try:
            self.end_headers()
        except OSError as e:
            raise ClientGone from e
        self._streaming = True

    def _stream_write(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if self._chunked else data)
        except OSError as e:
            raise ClientGone from e

    def _stream_end(self) -> None:
        if self._chunked:
            self._stream_write(b"")


class _Writer:
    """Turns generated text into OpenAI's answer for one job: server-sent chunks as the text
    comes, or one JSON object at the end."""

    def __init__(self, handler: Handler, job: Job, model: str):
        self.handler, self.job = handler, job
        kind = "chat.completion" if job.chat else "text_completion"
        self.base = {
            "id": f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": kind + ".chunk" if job.chat and job.stream else kind,
            "created": int(time.time()),
            "model": model,
        }
        self.parts: list[str] = []
        if job.stream:
            handler._stream_start()
            if job.chat:
                self._chunk({"role": "assistant", "content": ""}, None)

    def text(self, text: str) -> None:
        if text and self.job.stream:
            self._chunk({"content": text} if self.job.chat else text, None)
        elif text:
            self.parts.append(text)

    def finish(self, finish_reason: str, usage: dict) -> None:
        if not self.job.stream:
            text = "".join(self.parts)
            content = {"role": "assistant", "content": text} if self.job.chat else text
            self.handler._send_json(200, {**self.base, "choices": [self._choice(content, finish_reason)], "usage": usage})
            return
        self._chunk({} if self.job.chat else "", finish_reason)
        if self.job.include_usage:
            self.event(self.handler, {**self.base, "choices": [], "usage": usage})
        self.handler._stream_write(b"data: [DONE]\n\n")
        self.handler._stream_end()

    def _choice(self, content: dict | str, finish_reason: str | None) -> dict:
        """Chat's `message` (whole) or `delta` (streamed), or completions' `text`."""
        key = ("delta" if self.job.stream else "message") if self.job.chat else "text"
        return {"index": 0, key: content, "logprobs": None, "finish_reason": finish_reason}

    def _chunk(self, content: dict | str, finish_reason: str | None) -> None:
        usage = {"usage": None} if self.job.include_usage else {}
        self.event(self.handler, {**self.base, "choices": [self._choice(content, finish_reason)], **usage})

    @staticmethod
    def event(handler: Handler, obj: dict) -> None:
        handler._stream_write(b"data: " + json.dumps(obj).encode() + b"\n\n")


def make_server(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model_ids: list[str] | None = None,
    api_key: str | None = None,
    queue_size: int = 16,
    request_timeout: float = 600.0,
) -> Server:
    """A server for `engine` bound to host:port (port 0: any free port); call serve_forever().
    `model_ids` are the names clients may use in `model` (default: the engine's name)."""
    return Server(
        engine,
        (host, port),
        model_ids=model_ids or [engine.name],
        api_key=api_key,
        queue_size=queue_size,
        request_timeout=request_timeout,
    )
