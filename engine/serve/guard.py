"""What every request passes before a route sees it: authentication, then the body-size cap; and the pace at
which one client's bad requests are answered.

Both are plain ASGI middleware wrapped around the whole app (the engine's API, the A1111 routes, /docs,
/openapi.json and the Gradio demo alike), so no route can forget them.

- `Auth`: HTTP Basic with `user:pass` pairs (A1111's `--api-auth`) and/or API keys (`Authorization: Bearer
  KEY` or `X-API-Key: KEY`). Every configured secret is compared with `hmac.compare_digest`, all of them on
  every request, so neither the answer's timing nor its content says which part was wrong. 401 otherwise.
- `BodyLimit`: a body over `max_bytes` gets 413 without reaching the app: refused from its Content-Length
  at once, or counted while it streams. The body is read before the app runs and handed to it whole.

- `ErrorPacing`: client errors (4xx) go out at most `per_second` a second to one client address, after a
  burst of `burst`; the answer waits, nothing else does. A client that sends bad requests one after the
  other is held to that rate, so what it costs the server to refuse them stays small beside the work of
  good clients (benchmarks/bench_serve.py --abuse). Serve's proxy runs it (engine/serve/proxy.py).

Errors have the route's JSON shape: A1111's under /sdapi/ and /controlnet/, `{"error", "field"}` elsewhere.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time

A1111_PREFIXES = ("/sdapi/", "/controlnet/")


def error_body(path: str, field: str | None, message: str) -> dict:
    if path.startswith(A1111_PREFIXES):  # A1111's shape (engine/serve/a1111/routes.error_response)
        return {"error": "HTTPException", "detail": message, "body": "", "errors": message, "field": field}
    return {"error": message, "field": field}


async def send_error(send, path: str, status: int, message: str, headers: list | None = None,
                     field: str | None = None) -> None:
    """A JSON error in the route's shape. A 4xx names its field: given, else "body" (the request as a whole)."""
    field = field or ("body" if status < 500 else None)
    body = json.dumps(error_body(path, field, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def parse_credentials(text: str | None) -> list[tuple[str, str]]:
    """`user:pass[,user:pass...]` (A1111's --api-auth) -> [(user, pass)]; a malformed pair is an error."""
    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"api_auth takes user:password pairs separated by commas, got {item.strip()!r}")
        pairs.append((user, password))
    return pairs


def parse_keys(text: str | None) -> list[str]:
    return [key.strip() for key in (text or "").split(",") if key.strip()]


class Auth:
    """401 unless the request carries one of the configured Basic credentials or API keys."""

    def __init__(self, app, credentials: list[tuple[str, str]], keys: list[str]):
        self.app = app
        self.basic = [f"{user}:{password}".encode() for user, password in credentials]
        self.keys = [key.encode() for key in keys]

    def allowed(self, headers: dict[bytes, bytes]) -> bool:
        authorization = headers.get(b"authorization", b"")
        scheme, _, value = authorization.partition(b" ")
        offered_basic = offered_key = b""
        if scheme.lower() == b"basic":
            try:
                offered_basic = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                offered_basic = b""
        elif scheme.lower() == b"bearer":
            offered_key = value.strip()
        offered_key = headers.get(b"x-api-key", offered_key)
        ok = False
        for secret in self.basic:  # every secret compared, whatever matched, so timing says nothing
            ok |= hmac.compare_digest(secret, offered_basic)
        for secret in self.keys:
            ok |= hmac.compare_digest(secret, offered_key)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.allowed(dict(scope["headers"])):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        challenge = [(b"www-authenticate", b'Basic realm="controlnet-engine"')] if self.basic else []
        await send_error(send, scope["path"], 401, "authentication required: HTTP Basic (user:password) or an API key "
                                                   "(Authorization: Bearer KEY, or X-API-Key: KEY)", challenge, field="authorization")


class BodyLimit:
    """413 for a body over `max_bytes`; the app gets the body in one message, read before it runs."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, path, 413, f"request body is {int(declared)} bytes; at most {self.max_bytes} "
                                                     "are allowed")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_error(send, path, 413, f"request body is over {self.max_bytes} bytes, the most "
                                                         "allowed")
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnects, for streaming responses

        await self.app(scope, replay, send)


class ErrorPacing:
    """Answers with a 4xx status leave at most `per_second` a second per client address, after `burst` at
    once (a token bucket kept as the time its next answer is due, GCRA); other answers are never held."""

    def __init__(self, app, per_second: float, burst: int, clock=time.monotonic, sleep=asyncio.sleep):
        self.app, self.clock, self.sleep = app, clock, sleep
        self.interval = 1.0 / float(per_second)
        self.slack = int(burst) * self.interval
        self.due: dict[str, float] = {}  # client address -> when its next error answer is due

    def _wait(self, address: str) -> float:
        now = self.clock()
        if len(self.due) > 4096:  # forget clients whose pace has run out
            self.due = {a: t for a, t in self.due.items() if t > now}
        due = max(self.due.get(address, now), now) + self.interval
        self.due[address] = due
        return due - now - self.slack

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("unknown",))[0]

        async def paced(message):
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                wait = self._wait(address)
                if wait > 0:
                    await self.sleep(wait)
            await send(message)

        await self.app(scope, receive, paced)
