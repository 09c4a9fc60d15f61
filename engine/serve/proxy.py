"""The answers Ray Serve's HTTP proxy gives itself, in the API's JSON error shape.

When a replica process dies during a request (killed, out of memory, crashed), Serve's proxy gets an actor
error and ends the request without a response, which the HTTP server turns into a plain-text 500; past
`max_queued_requests` it answers a plain-text 503 (with `Retry-After` from the deployment's
`backpressure_config`), past `request_timeout_s` a plain-text 408. `middlewares()` gives the proxy an ASGI
middleware that turns these into JSON (`{"error", "field"}`, A1111's shape under its routes): a request
whose replica died gets a 503 saying so, with `Retry-After`, so a client can tell a failure of the server
from a bad request and knows when to try again. Responses from the app itself pass unchanged. It also caps
request bodies (guard.BodyLimit, `ENGINE_PROXY_MAX_BODY_BYTES`, default 32 MiB): the proxy reads a client's
body as fast as it comes, so an oversized one is refused there, never streamed on to a replica; and it
paces each client address's 4xx answers (guard.ErrorPacing: `ENGINE_PROXY_ERROR_BURST`, default 20, then
`ENGINE_PROXY_ERRORS_PER_S`, default 4).

The proxy loads it from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=engine.serve.proxy:middlewares`, which
must be in the environment of the Ray node that runs the proxy: `engine.serve.local.start_local_serve` sets
it before starting Ray; on a cluster set it for `ray start` (docs/SERVING.md).
"""
from __future__ import annotations

from engine.serve.guard import BodyLimit, ErrorPacing, send_error

CALLBACK = "engine.serve.proxy:middlewares"
MAX_BODY_VAR = "ENGINE_PROXY_MAX_BODY_BYTES"  # the proxy's cap on a request body (default: Limits' 32 MiB)
# 4xx answers to one client address: ERROR_BURST at once, then ERRORS_PER_S a second (guard.ErrorPacing). A client
# sending bad requests back to back cost the good clients' p95 2.5x unpaced (bench_serve --abuse, 2-core EPYC).
ERRORS_PER_S, ERROR_BURST = 4.0, 20
ERRORS_PER_S_VAR, ERROR_BURST_VAR = "ENGINE_PROXY_ERRORS_PER_S", "ENGINE_PROXY_ERROR_BURST"
RETRY_AFTER_S = 5  # what a client is told to wait after a 503: a busy queue drains, a failed replica restarts
_PROXY_STATUSES = (408, 500, 503)  # the proxy's own answers come as plain text


def middlewares() -> list:
    """The proxy's middleware: JSON for its own failures, the body-size cap before any byte of an oversized
    body reaches a replica (each replica caps it again at its app's own `Limits.max_body_bytes`), and the
    pace of client errors per client address (guard.ErrorPacing)."""
    import os

    from starlette.middleware import Middleware

    from engine.serve.api import Limits

    cap = int(os.environ.get(MAX_BODY_VAR, Limits().max_body_bytes))
    pace = dict(per_second=float(os.environ.get(ERRORS_PER_S_VAR, ERRORS_PER_S)),
                burst=int(os.environ.get(ERROR_BURST_VAR, ERROR_BURST)))
    # Each wraps the ones before it: the pacing sees every answer, the body cap's 413 included.
    return [Middleware(JsonFailures), Middleware(BodyLimit, max_bytes=cap), Middleware(ErrorPacing, **pace)]


class JsonFailures:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "held": None, "body": b""}

        async def relay(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                headers = [tuple(h) for h in message.get("headers", [])]
                ctype = dict(headers).get(b"content-type", b"")
                if message["status"] in _PROXY_STATUSES and ctype.startswith(b"text/plain"):
                    state["held"] = (message["status"], headers)
                    return
            elif message["type"] == "http.response.body" and state["held"] is not None:
                state["body"] += message.get("body", b"")
                if message.get("more_body", False):
                    return
                status, headers = state["held"]
                kept = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
                return await send_error(send, scope["path"], status, state["body"].decode("utf-8", "replace"), kept)
            await send(message)

        await self.app(scope, receive, relay)
        if not state["started"]:
            await send_error(send, scope["path"], 503,
                             "the replica serving this request stopped before it answered (its process died: killed, "
                             "out of memory or crashed); Serve starts a new one: retry the request",
                             [(b"retry-after", str(RETRY_AFTER_S).encode())])
