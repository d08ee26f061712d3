"""How `tinysaver serve` stops: SIGTERM under load, and kill -9.

    python benchmarks/bench_stop.py [--clients 16] [--high-throughput] [--verbose]

1. Starts the service on the bundled Fashion-MNIST zoo, has ``--clients`` threads post a PNG back to
   back, sends SIGTERM to the service's process group, and counts what the clients got until the
   command exited: answers (200), drain refusals (503), refused connections (nothing listened, so
   nothing was sent) and requests cut off without an answer ("dropped": the figure that must be 0).
2. Starts it again, kills the command with SIGKILL, and times how long its local Ray's processes
   and its temp folder outlive it.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image

from tinysaver.serve.lifecycle import HEAD_PREFIX, OWNER
from tinysaver.serve.reaper import in_session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, extra: list[str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tinysaver", "serve", "--zoo", "fashion-mnist", "--base", "resnet10t",
                             "--port", str(port), *extra], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    for _ in range(480):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the service did not start: {log.read_text()[-2000:]}")


def sigterm_under_load(port: int, extra: list[str], clients: int, log: Path) -> dict:
    proc = start(port, extra, log)
    buf = io.BytesIO()
    Image.new("L", (28, 28), 128).save(buf, "PNG")
    img, url = buf.getvalue(), f"http://127.0.0.1:{port}"
    counts, done, drops, t0 = Counter(), threading.Event(), [], [time.monotonic()]

    def client():
        with httpx.Client(base_url=url, timeout=60) as c:
            while not done.is_set():
                try:
                    counts[c.post("/predict", content=img, headers={"content-type": "image/png"}).status_code] += 1
                except httpx.ConnectError:
                    counts["refused"] += 1
                    time.sleep(0.05)
                except httpx.TransportError as e:
                    counts["dropped"] += 1
                    drops.append(f"{time.monotonic() - t0[0]:.2f} s {type(e).__name__}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(3.0)
    t0[0] = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(120)
    exit_s = time.monotonic() - t0[0]
    time.sleep(0.5)
    done.set()
    for t in threads:
        t.join()
    return {"exit_s": exit_s, "drops": drops, **counts}


def kill9(port: int, extra: list[str], log: Path) -> dict:
    proc = start(port, extra, log)
    folder = next(d for d in Path(tempfile.gettempdir()).glob(HEAD_PREFIX + "*")
                  if (d / OWNER).read_text().split()[0] == str(proc.pid))
    sid = int((folder / OWNER).read_text().split()[1])
    before = len(in_session(sid))
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    while in_session(sid) and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    gone_s = time.monotonic() - t0
    while folder.exists() and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    return {"ray_processes": before, "processes_gone_s": gone_s, "left": len(in_session(sid)),
            "folder_gone_s": time.monotonic() - t0, "folder_left": folder.exists()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--high-throughput", action="store_true", help="Serve's HAProxy ingress instead of its proxy")
    ap.add_argument("--verbose", action="store_true", help="pass --verbose and print the service's own stop lines")
    args = ap.parse_args()
    extra = (["--high-throughput"] if args.high_throughput else []) + (["--verbose"] if args.verbose else [])
    logs = Path(tempfile.mkdtemp(prefix="bench-stop-"))
    s = sigterm_under_load(free_port(), extra, args.clients, logs / "sigterm.log")
    print(f"SIGTERM at concurrency {args.clients}{' (high-throughput)' if extra else ''}: exited in {s['exit_s']:.1f} s; "
          f"200: {s.get(200, 0)}, 503: {s.get(503, 0)}, refused: {s.get('refused', 0)}, "
          f"dropped without an answer: {s.get('dropped', 0)}, other: "
          f"{sum(v for k, v in s.items() if k not in (200, 503, 'refused', 'dropped', 'exit_s', 'drops'))}")
    if s['drops']:
        print('dropped at (after SIGTERM):', ', '.join(sorted(set(s['drops']))))
    if args.verbose:
        print("".join(line for line in (logs / "sigterm.log").read_text().splitlines(True) if "tinysaver:" in line))
    k = kill9(free_port(), extra, logs / "kill9.log")
    print(f"kill -9: {k['ray_processes']} Ray processes gone {k['processes_gone_s']:.1f} s after "
          f"({k['left']} left); temp folder removed after {k['folder_gone_s']:.1f} s"
          f"{' (still there)' if k['folder_left'] else ''}")


if __name__ == "__main__":
    main()
