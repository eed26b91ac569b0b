"""A scripted OpenAI chat-completions server on 127.0.0.1, for tests that use the real SDK.

Tests point the official ``openai`` client at :attr:`FakeOpenAI.base_url` and exercise the
whole HTTP path (auth header, JSON parsing, the SDK's own retries and timeouts) instead of
patching the client::

    with FakeOpenAI() as server:
        server.script(Reply("first"), Reply.rate_limited(), Reply("second"))
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")
        ...
        assert server.requests[0].headers["authorization"] == "Bearer sk-test"

Endpoints: ``POST /v1/chat/completions`` (non-streaming), ``GET /v1/models``; anything else
is a 404 in OpenAI's error format.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections import deque
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
        reply = self.server.fake._next_reply()
        if reply is None:
            # A test that forgot to script a reply is a bug, so tell the SDK not to retry it.
            message = "FakeOpenAI: no scripted reply left and no default set."
            self._send(500, _error_body(message, "server_error"), {"x-should-retry": "false"})
            return
        fake = self.server.fake
        fake._in_flight(+1)
        try:
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

    def __init__(self) -> None:
        self._lock = threading.Lock()
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

    def _next_reply(self) -> Reply | None:
        with self._lock:
            return self._queue.popleft() if self._queue else self._default

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
