"""What a liveness probe sees while `tinysaver serve` starts, from the command's first second.

    python benchmarks/bench_startup_probe.py --zoo fashion-mnist --base resnet10t

Starts the command (a local Ray of its own) and probes ``--path`` (``/v2/health/live``) every
``--every-s`` seconds with a one-second timeout, as a Kubernetes probe with ``timeoutSeconds: 1``
does, until the service is ready (``/readyz`` 200). Prints each change of answer with its time
(refused, a status code, or a timeout), then the seconds in which the probe failed, in total and
the longest run of failures, against the seconds until ready. Kubernetes restarts a pod after
``failureThreshold`` (3) failures in a row, so the longest run is the figure that matters.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from common import parser
from loadgen import free_port


def outcome(url: str) -> str:
    try:
        return str(httpx.get(url, timeout=1.0).status_code)
    except httpx.ConnectError:
        return "refused"
    except httpx.TimeoutException:
        return "timeout"
    except httpx.TransportError as e:
        return type(e).__name__


def main() -> int:
    ap = parser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="resnet10t")
    ap.add_argument("--path", default="/v2/health/live")
    ap.add_argument("--every-s", type=float, default=0.25)
    ap.add_argument("--limit-s", type=float, default=300.0)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"load {os.getloadavg()[0]:.2f} before", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tinysaver", "serve", "--zoo", args.zoo, "--base", args.base,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    changes, last, ready_s = [], None, None
    try:
        while time.monotonic() - t0 < args.limit_s:
            tick = time.monotonic() - t0
            got = outcome(url + args.path)
            if got != last:
                changes.append((tick, got))
                last = got
            if got == "200" and outcome(url + "/readyz") == "200":
                ready_s = time.monotonic() - t0
                break
            time.sleep(max(0.0, args.every_s - (time.monotonic() - t0 - tick)))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    for at, got in changes:
        print(f"  {at:6.2f} s  {args.path} → {got}")
    if ready_s is None:
        print(f"not ready within {args.limit_s:g} s")
        return 1
    # a run of failures lasts from the first failed probe to the next probe that succeeded (timed by
    # the clock: a probe that times out takes its second, not the interval)
    runs, since = [], None
    for at, got in changes + [(ready_s, "200")]:
        if got != "200" and since is None:
            since = at
        elif got == "200" and since is not None:
            runs.append(at - since)
            since = None
    print(f"ready after {ready_s:.1f} s; the probe failed for {sum(runs):.2f} s in all, {max(runs):.2f} s at most in "
          "a row")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
