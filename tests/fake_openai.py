"""A scripted OpenAI chat-completions server on 127.0.0.1, for tests that use the real SDK.

Tests point the official ``openai`` client at :attr:`FakeOpenAI.base_url` and exercise the
whole HTTP path (auth header, JSON parsing, the SDK's own retries and timeouts) instead of
patching the client::

    with FakeOpenAI() as server:
        server.script(Reply("first"), Reply.rate_limited(), Reply("second"))
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")
        ...
        assert server.requests[0].headers["authorization"] == "Bearer sk-test"

Beyond a fixed script it can play the servers the client must cope with:

- ``FakeOpenAI(slots=1)``: one request generated at a time, the rest queued, and a request
  the client gave up on still generated to the end (llama.cpp's server with one slot);
- :meth:`FakeOpenAI.accept_formats`: refuse other ``response_format`` kinds with a 422, as
  llama-cpp-python's server refuses OpenAI's ``json_schema``;
- :meth:`FakeOpenAI.respond`: replies computed from each request (a judge that prefers one
  text); :meth:`FakeOpenAI.fail_after`: a server that fails halfway through a run;
- :attr:`FakeOpenAI.chat_count`: chat requests received, to prove a cache made none.

Endpoints: ``POST /v1/chat/completions`` (non-streaming), ``GET /v1/models``; anything else
is a 404 in OpenAI's error format.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL_ID = "fake-model"

# OpenAI's error "type" for the statuses tests care about; anything else is a generic api_error.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout",
    409: "conflict",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass(frozen=True)
class Reply:
    """One scripted answer to a chat-completions request.

    Status 200 gives a ``chat.completion`` whose message is ``content``. Any other status gives
    an OpenAI-style error ``{"error": {"message", "type", "code"}}`` whose message is
    ``content`` (or the status phrase); ``body`` replaces that JSON wholesale when given.
    ``delay`` seconds pass before the answer is written, so a delay longer than the client's
    timeout looks like a hung server.
    """

    content: str = ""
    status: int = 200
    finish_reason: str = "stop"
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    prompt_tokens: int = 10
    completion_tokens: int = 20

    @classmethod
    def rate_limited(cls, retry_after: float = 1) -> Reply:
        """A 429 with a ``Retry-After`` header (seconds; the SDK also accepts fractions)."""
        return cls(
            "Rate limit reached. Please try again later.",
            status=429,
            headers={"Retry-After": f"{retry_after:g}"},
            body=_error_body("Rate limit reached.", "rate_limit_error", "rate_limit_exceeded"),
        )

    @classmethod
    def server_error(cls) -> Reply:
        """A 500, which the SDK treats as retryable."""
        return cls("The server had an error while processing your request.", status=500)

    @classmethod
    def unauthorized(cls) -> Reply:
        """A 401 for a bad key, as the real API sends it."""
        return cls(
            status=401,
            body=_error_body(
                "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            ),
        )

    @classmethod
    def hang(cls, seconds: float) -> Reply:
        """Answer only after ``seconds``; pair with a shorter client timeout."""
        return cls("late answer", delay=seconds)


@dataclass(frozen=True)
class Request:
    """One request as the server received it; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


# response_format kinds, named as instruct.openai_client.FORMS names them.
FORMS = ("json_schema", "json_object+schema", "json_object", "none")


def format_of(body: Any) -> str:
    """Which kind of ``response_format`` a request body asks for."""
    fmt = body.get("response_format") if isinstance(body, dict) else None
    if not fmt:
        return "none"
    if fmt.get("type") == "json_object":
        return "json_object+schema" if fmt.get("schema") else "json_object"
    return str(fmt.get("type"))


def _error_body(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a made-up status such as 599
        return f"HTTP {status}"


class _Server(ThreadingHTTPServer):
    """The stdlib server, plus the back-reference and open sockets that handlers need."""

    daemon_threads = True  # a hung handler must never keep the test process alive
    block_on_close = False

    def __init__(self, fake: FakeOpenAI) -> None:
        self.fake = fake
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so the SDK's pooled keep-alive connections behave as they do against the API.
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.fake._lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.fake._lock:
            self.server.connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # the client hung up first (e.g. it timed out); nothing left to flush

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: pytest output is for failures, not access logs."""

    def do_GET(self) -> None:
        self._record(None)
        if self.path.rstrip("/") == "/v1/models":
            model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "fake"}
            self._send(200, {"object": "list", "data": [model]})
        else:
            self._not_found()

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            self._record(raw.decode("utf-8", "replace"))
            self._send(400, _error_body("Request body is not valid JSON.", "invalid_request_error"))
            return
        self._record(body)
        if self.path != "/v1/chat/completions":
            self._not_found()
            return
        if isinstance(body, dict) and body.get("stream"):
            # Fail loudly rather than send a JSON body the SDK's stream parser would choke on.
            message = "FakeOpenAI does not support stream=true."
            self._send(400, _error_body(message, "invalid_request_error"))
            return
        fake = self.server.fake
        refusal = fake._refuse_format(body)
        if refusal is not None:
            self._send(422, refusal)
            return
        reply = fake._next_reply(body)
        if reply is None:
            # A test that forgot to script a reply is a bug, so tell the SDK not to retry it.
            message = "FakeOpenAI: no scripted reply left and no default set."
            self._send(500, _error_body(message, "server_error"), {"x-should-retry": "false"})
            return
        fake._in_flight(+1)
        try:
            with fake._slot() as slot:
                # A queued request waits for a slot; one the client gave up on keeps its slot
                # to the end, as a real server keeps generating it.
                if not slot:
                    return
                if reply.delay > 0 and fake._closed.wait(reply.delay):
                    return  # shut down mid-hang: the socket is gone, so do not try to answer
            model = body.get("model", MODEL_ID) if isinstance(body, dict) else MODEL_ID
            self._send(reply.status, fake._payload(reply, model), reply.headers)
        finally:
            fake._in_flight(-1)

    def _record(self, body: Any) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.server.fake._record(Request(self.command, self.path, headers, body))

    def _not_found(self) -> None:
        message = f"Unknown request URL: {self.command} {self.path}."
        self._send(404, _error_body(message, "invalid_request_error", "unknown_url"))

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            # The client gave up (timeout) and closed the socket; that is expected, not an error.
            self.close_connection = True


class FakeOpenAI:
    """A scripted OpenAI-compatible server in a background thread; see the module docstring.

    It starts listening on construction; :meth:`close` (or leaving the ``with`` block) stops it
    promptly, even with a hung request in flight.
    """

    def __init__(self, slots: int | None = None) -> None:
        self._lock = threading.Lock()
        # At most this many replies are generated at once; None: no limit.
        self._slots = threading.BoundedSemaphore(slots) if slots else None
        self._formats: set[str] | None = None  # accepted response_format kinds; None: all
        self._responder: Callable[[Any], Reply] | None = None
        self._fail_after: tuple[int, Reply] | None = None
        self._served = 0  # chat requests answered from the script, responder or default
        self._closed = threading.Event()
        self._queue: deque[Reply] = deque()
        self._default: Reply | None = None
        self._requests: list[Request] = []
        self._active = 0
        self.max_in_flight = 0  # most chat requests being answered at once (concurrency proof)
        self._ids = itertools.count(1)
        self._httpd = _Server(self)
        self.port: int = self._httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        # 50 ms poll (stdlib default 0.5 s) so close() returns quickly.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def requests(self) -> list[Request]:
        """A snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next chat-completions requests, consumed in order."""
        with self._lock:
            self._queue.extend(replies)

    def default(self, reply: Reply | None) -> None:
        """Set the reply used once the script runs out (``None``: answer 500 instead)."""
        with self._lock:
            self._default = reply

    def respond(self, responder: Callable[[Any], Reply] | None) -> None:
        """Compute replies from each request's JSON body once the script runs out (before the
        default): ``server.respond(lambda body: Reply(...))``."""
        with self._lock:
            self._responder = responder

    def accept_formats(self, *forms: str) -> None:
        """Accept only these ``response_format`` kinds (of :data:`FORMS`); others get the 422
        llama-cpp-python's server sends for an unknown type. No arguments: accept all."""
        unknown = set(forms) - set(FORMS)
        if unknown:
            raise ValueError(f"unknown response_format kinds {sorted(unknown)}; known: {FORMS}")
        with self._lock:
            self._formats = set(forms) or None

    def fail_after(self, n: int, reply: Reply | None = None) -> None:
        """Answer ``n`` more chat requests as usual, then every later one with ``reply``
        (default: a 500) — a server that dies halfway through a run."""
        with self._lock:
            self._fail_after = (self._served + n, reply or Reply.server_error())

    @property
    def chat_count(self) -> int:
        """Chat-completion requests received so far (refused and failed ones included)."""
        with self._lock:
            return sum(r.path == "/v1/chat/completions" for r in self._requests)

    def close(self) -> None:
        """Stop serving and drop open connections; safe to call more than once."""
        if self._closed.is_set():
            return
        self._closed.set()  # wakes handlers sleeping in a Reply.delay
        self._httpd.shutdown()
        with self._lock:
            connections = list(self._httpd.connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # unblocks handlers idling on keep-alive reads
            except OSError:
                pass
        self._httpd.server_close()
        self._thread.join(timeout=1)

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)

    def _in_flight(self, change: int) -> None:
        with self._lock:
            self._active += change
            self.max_in_flight = max(self.max_in_flight, self._active)

    def _next_reply(self, body: Any) -> Reply | None:
        with self._lock:
            if self._fail_after is not None and self._served >= self._fail_after[0]:
                return self._fail_after[1]
            self._served += 1
            if self._queue:
                return self._queue.popleft()
            responder, default = self._responder, self._default
        return responder(body) if responder is not None else default

    def _refuse_format(self, body: Any) -> dict[str, Any] | None:
        """The 422 body for a response_format this server does not accept, else None."""
        with self._lock:
            formats = self._formats
        kind = format_of(body)
        if formats is None or kind in formats:
            return None
        # FastAPI's validation error, as llama-cpp-python's server words it.
        detail = {
            "type": "literal_error",
            "loc": ["body", "response_format", "type"],
            "msg": "Input should be 'text' or 'json_object'",
            "input": kind,
        }
        return {"detail": [detail]}

    @contextlib.contextmanager
    def _slot(self) -> Iterator[bool]:
        """Hold one generation slot; yields False when the server closed while queued."""
        if self._slots is None:
            yield True
            return
        while not self._slots.acquire(timeout=0.05):
            if self._closed.is_set():
                yield False
                return
        try:
            yield True
        finally:
            self._slots.release()

    def _payload(self, reply: Reply, model: str) -> dict[str, Any]:
        if reply.body is not None:
            return reply.body
        if reply.status != 200:
            default_type = "server_error" if reply.status >= 500 else "api_error"
            type_ = _ERROR_TYPES.get(reply.status, default_type)
            return _error_body(reply.content or _phrase(reply.status), type_)
        return {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": reply.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": reply.prompt_tokens,
                "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
            },
            "system_fingerprint": None,
        }
