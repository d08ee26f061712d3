"""The service's port answered while Ray starts, so that a liveness probe is right from the first second.

`tinysaver serve` chooses its cascade, checks its models and starts a local Ray before Serve's
proxy can listen: seconds in which the port would refuse connections, and a Kubernetes liveness
probe would restart the pod for a slow start. From the moment the command has read its options
until the proxy takes the port, a small HTTP server of the command's own answers it: the liveness
routes (``/livez``, ``/v2/health/live``) 200, and every other request 503 with ``Retry-After``,
in the service's error shape, as the ingress itself answers while its stages load.

Nothing here imports Ray, and must not: the command line loads this module before it sets
``RAY_AUTH_MODE``, which Ray reads once, when imported, so a Ray imported through here left the
command's driver without its token (``InvalidAuthToken``, seen when this module took
``RETRY_AFTER_S`` from ``drain``).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .http import RETRY_AFTER_S
from .routes import HEALTH, ROUTES

# what the ingress's own liveness handlers answer (deployments.IngressServer.livez, .oip_live)
LIVE = {"livez": {"status": "live"}, "oip_live": {"live": True}}
STARTING = "starting: the service is not up yet; retry shortly"


# /healthz's body while the ingress waits for its stages has this shape too (IngressServer.healthz)
WAITING = {"status": "starting", "waiting_for": ["the local Ray and Serve's proxy"]}


class _Handler(BaseHTTPRequestHandler):
    live = {r.path: LIVE[r.handler] for r in ROUTES if r.handler in LIVE and r.method == "GET"}

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        body = self.live.get(path) if self.command in ("GET", "HEAD") else None
        status = 200 if body is not None else 503
        refusal = WAITING if path == HEALTH and self.command in ("GET", "HEAD") else {"error": STARTING}
        data = json.dumps(body if body is not None else refusal).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 503:
            self.send_header("Retry-After", str(RETRY_AFTER_S))
        self.send_header("Connection", "close")  # the next request finds Serve's proxy once it is up
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

    def log_message(self, format, *args):  # noqa: A002 - the base class's name; the command's log is its own
        pass


class StartingServer:
    """Answers ``host:port`` in a thread until `close`; a context manager."""

    def __init__(self, host: str, port: int):
        self.server = ThreadingHTTPServer((host, port), _Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="tinysaver-starting", daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop answering and free the port (for Serve's proxy)."""
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["LIVE", "STARTING", "StartingServer", "WAITING"]
