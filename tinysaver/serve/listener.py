"""Close a local Ray's HTTP listener before the node stops, so that no request is cut off unanswered.

Ray Serve's proxy has no graceful stop: when the node stops, the proxy is killed with whatever
requests it holds, and each of their clients sees the connection dropped without a status (a trial
of 16 clients sending through a stop lost 25 requests that way, all in the last moment). A drain
already answers every new request with 503 and ``Connection: close``, so clients reconnect for each
request. What is left is to stop the proxy accepting: this module takes a copy of the proxy's
listening socket (``pidfd_getfd``, Linux 5.6 and later, allowed for a process's own descendants)
first stops new handshakes (a filter that drops every packet to the listener), lets the proxy accept
the connections already waiting, and then shuts it down. New connections are then refused, which a
client can tell means "nothing was sent", while the connections the proxy holds get their answers.
Then the node stops.

Linux only, and best effort: where the kernel or a sandbox refuses the calls, nothing is closed and
the stop goes on as before. Nothing here imports Ray.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

SO_ATTACH_FILTER = 26  # Linux's socket option for a classic BPF filter (socket has no name for it)
BACKLOG_S = 0.2  # time for the proxy to accept the connections already waiting in its listener's backlog
LISTEN, ESTABLISHED = "0A", "01"  # TCP states as /proc/net/tcp writes them
_PIDFD_OPEN, _PIDFD_GETFD = 434, 438  # syscall numbers, the same on x86-64 and arm64


def _sockets(port: int, state: str) -> set[str]:
    """Inodes of this network namespace's TCP sockets on local ``port`` in ``state``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == state:
                found.add(cols[9])
    return found


def _drop_all(sock: socket.socket) -> None:
    """Attach a packet filter that drops everything to a listener: a new client's SYN goes
    unanswered (its kernel sends it again a second later and is then refused), while the
    connections already made wait to be accepted."""
    ret_zero = (ctypes.c_uint16 * 4)(0x06, 0, 0, 0)  # one classic BPF instruction: BPF_RET | BPF_K, k = 0 bytes kept
    prog = struct.pack("HL", 1, ctypes.addressof(ret_zero))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)


def connections(port: int) -> int:
    """How many connections to local ``port`` are open (held by whoever listens there)."""
    return len(_sockets(port, ESTABLISHED))


def close_listener(pids: list[int], port: int) -> int:
    """Shut down every socket listening on ``port`` that one of ``pids`` holds; returns how many were
    shut (0 where none was found or the kernel refused)."""
    inodes = _sockets(port, LISTEN)
    if not inodes:
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return 0
    shut = 0
    for pid in pids:
        try:
            fds = [(fd, os.readlink(f"/proc/{pid}/fd/{fd}")) for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        mine = [int(fd) for fd, target in fds if target.startswith("socket:[") and target[8:-1] in inodes]
        if not mine:
            continue
        pidfd = libc.syscall(_PIDFD_OPEN, pid, 0)
        if pidfd < 0:
            continue
        try:
            for fd in mine:
                copy = libc.syscall(_PIDFD_GETFD, pidfd, fd, 0)
                if copy < 0:
                    continue
                with socket.socket(fileno=copy) as sock:
                    try:
                        _drop_all(sock)
                        # a connection whose handshake had completed waits in the backlog until the
                        # proxy accepts it: shut down now, it would be reset with its request sent
                        time.sleep(BACKLOG_S)
                        sock.shutdown(socket.SHUT_RDWR)  # a listener shut down refuses new connections at once
                        shut += 1
                    except OSError:
                        pass
        finally:
            os.close(pidfd)
        if _name(pid) == "haproxy":
            # Serve's high-throughput proxy keeps its clients' connections alive whatever the replica
            # answers: its soft stop closes each after the answer in progress, and the idle ones at once
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGUSR1)
    return shut


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def settle(port: int, timeout_s: float, poll_s: float = 0.05) -> int:
    """Wait until no connection to ``port`` is open, at most ``timeout_s``; returns how many still are."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = connections(port)
        if left == 0 or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)


@contextlib.contextmanager
def kept_closed(pids: Callable[[], list[int]], port: int, poll_s: float = 0.05) -> Iterator[None]:
    """While the block runs, close again any listener on ``port`` that one of ``pids()`` opens: a
    node being stopped may restart its proxy (Serve restarts HAProxy), which would take requests
    only to be killed with them."""
    done = threading.Event()

    def watch():
        while not done.wait(poll_s):
            with contextlib.suppress(OSError):
                close_listener(pids(), port)

    t = threading.Thread(target=watch, name="tinysaver-listener", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


__all__ = ["close_listener", "connections", "kept_closed", "settle"]
