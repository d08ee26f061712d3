"""The service's port answered while Ray starts, so that a liveness probe is right from the first second.

`tinysaver serve` chooses its cascade, checks its models and starts a local Ray before Serve's
proxy can listen: seconds in which the port would refuse connections, and a Kubernetes liveness
probe would restart the pod for a slow start. From the moment the command has read its options
until the proxy takes the port, a small HTTP server of the command's own answers it: the liveness
routes (``/livez``, ``/v2/health/live``) 200, and every other request 503 with ``Retry-After``,
in the service's error shape, as the ingress itself answers while its stages load.

The hand-over leaves no gap where the kernel allows it (Linux). Serve's proxy binds its port with
``SO_REUSEPORT``, so this server binds the same way, and both listen at once. A one-instruction
classic BPF program on the port's ``SO_REUSEPORT`` group sends every new connection to this server
(the group's first socket) until the application answers through the proxy; then the program sends
them to the proxy (`StartingServer.hand_over`), and this server answers what it had already accepted
and closes. Measured before this (`benchmarks/bench_startup_probe.py`): 7.7 to 10.4 s of failed
probes at the hand-over (refused while the proxy bound, 404 before the application existed, a wait
inside the proxy for the ingress replica).

Nothing here imports Ray, and must not: the command line loads this module before it sets
``RAY_AUTH_MODE``, which Ray reads once, when imported, so a Ray imported through here left the
command's driver without its token (``InvalidAuthToken``, seen when this module took
``RETRY_AFTER_S`` from ``drain``).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .http import RETRY_AFTER_S
from .routes import HEALTH, ROUTES

# what the ingress's own liveness handlers answer (deployments.IngressServer.livez, .oip_live)
LIVE = {"livez": {"status": "live"}, "oip_live": {"live": True}}
STARTING = "starting: the service is not up yet; retry shortly"
STARTING_HEADER = "X-Tinysaver-Starting"  # on this server's answers: a hand-over check must not count them


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
        self.send_header(STARTING_HEADER, "1")
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


SO_ATTACH_REUSEPORT_CBPF = 51  # Linux's asm-generic/socket.h
SO_DETACH_REUSEPORT_BPF = 68
BPF_RET_K = 0x06  # BPF_RET | BPF_K: return the constant


class _Insn(ctypes.Structure):  # struct sock_filter
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):  # struct sock_fprog
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def steer(sock: socket.socket, index: int) -> None:
    """Send each new connection to ``sock``'s port to the ``index``-th listening socket of its
    ``SO_REUSEPORT`` group (0: the first to listen). An index past the group's end falls back to the
    kernel's hash, which is what a group of one socket gets. Raises `OSError` where unsupported."""
    insn = _Insn(BPF_RET_K, 0, 0, index)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(_Prog(1, ctypes.pointer(insn))))


class StartingServer:
    """Answers ``host:port`` in a thread until `close` or `hand_over`; a context manager.

    ``share``: bind with ``SO_REUSEPORT`` and keep every connection (`steer`) while another server,
    Serve's proxy, listens on the same port beside it. ``shared`` says whether that worked; if not
    (another OS, an old kernel), the port is held alone and must be closed before the proxy binds."""

    def __init__(self, host: str, port: int, share: bool = False):
        self.shared = False
        if share:
            try:
                self.server = self._bind(host, port, share=True)
                self.shared = True
            except OSError:
                self.server = None
        if not self.shared:
            self.server = self._bind(host, port, share=False)
        self.thread = threading.Thread(target=self.server.serve_forever, name="tinysaver-starting", daemon=True)
        self.thread.start()
        self.open = True

    @staticmethod
    def _bind(host: str, port: int, share: bool) -> ThreadingHTTPServer:
        server = ThreadingHTTPServer((host, port), _Handler, bind_and_activate=False)
        server.daemon_threads = True
        try:
            server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if share:
                server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            server.server_bind()
            server.server_activate()
            if share:
                steer(server.socket, 0)
        except BaseException:
            server.server_close()
            raise
        return server

    def hand_over(self, answers, settle_s: float = 0.3) -> bool:
        """Send new connections to the port's other listener (the proxy); if ``answers()`` (a check
        through the port, which must not count answers carrying `STARTING_HEADER`) is then true,
        answer what was accepted already, close and return True; else take the port back, False."""
        if not self.shared or not self.open:
            return False
        steer(self.server.socket, 1)
        if not answers():
            steer(self.server.socket, 0)
            return False
        time.sleep(settle_s)  # connections in this socket's queue are accepted and answered, not reset
        self.server.shutdown()  # no longer accepting; new connections still all go to the proxy
        # the port's group as Serve's proxy would have it alone: no program (closed at once after)
        with contextlib.suppress(OSError):
            self.server.socket.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
        self.close()
        return True

    def close(self) -> None:
        """Stop answering and free the port (for Serve's proxy)."""
        if self.open:
            self.open = False
            if self.thread.is_alive():
                self.server.shutdown()
            self.server.server_close()
            self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["LIVE", "STARTING", "STARTING_HEADER", "StartingServer", "WAITING", "steer"]
