"""A sustained load on the fused service: memory, tail latency, errors and the audit over time.

    python benchmarks/soak_serve.py --minutes 10 --concurrency 16 --hostile 0.01

One local Ray instance serves the default cascade (fused layout, eager, audit 5 %). A closed-loop
httpx client on 127.0.0.1 only keeps ``--concurrency`` requests in flight for ``--minutes``, or
until ``--max-requests`` have been sent, whichever comes first. Each minute it prints the p50 and
p99 of the client's latency, the errors, the audit's state from ``/healthz``, and the resident
memory (RSS) of every Serve process (proxy, controller, replicas). At the end it checks the goals:
no errors, every Serve process's RSS within +10 % of its size after the first minute, and the
last minute's p99 ≤ 1.5× the first minute's.

With ``--hostile F``, a seeded fraction F of the requests are hostile, in turn:
- small files with shapes that must be refused from their header (100000 × 1, 1 × 100000, 65535 × 2,
  12000², 20000² PNGs): 413 is the right answer;
- legal but memory-heavy images (a 6000 × 6000 RGB PNG, 108 MB decoded, under --max-pixels): 200, or
  503 while the replica's pool of decoded pixels is full;
- a slow body (headers announcing 1000 bytes, 10 sent, then silence): 408 at the body timeout.
Anything else is an error.

RSS is compared with the end of the first minute, not with start-up: the first requests fill the
allocators' pools and torch's caches once, which is a warm-up, not a leak. Both figures are printed.
"""
import asyncio
import os
import time

import numpy as np

from loadgen import encoded_images, start_local_service
from common import parser, table_head

SERVE_PROCESS_NAMES = ("ray::ServeReplica", "ray::ProxyActor", "ray::ServeController")


def serve_rss() -> dict[str, float]:
    """RSS in MiB of every Serve process on this machine, by process title and pid."""
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if title.startswith(SERVE_PROCESS_NAMES):
            # a Ray worker's title names the method it runs now (ServeController.listen_for_change):
            # keep the actor's part only, so a process keeps one name over the run
            name = title.split()[0].split(".")[0]
            try:
                out[f"{name}[{p.info['pid']}]"] = p.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                pass
    return out


HOSTILE_SHAPES = [(100000, 1), (1, 100000), (65535, 2), (12000, 12000), (20000, 20000)]


def hostile_images() -> list[bytes]:
    """PNGs of zeros in :data:`HOSTILE_SHAPES`: a few hundred bytes to a few hundred kB each."""
    import io

    from PIL import Image

    out = []
    for w, h in HOSTILE_SHAPES:
        buf = io.BytesIO()
        Image.new("L", (w, h)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


HEAVY = (6000, 6000)


def heavy_image() -> bytes:
    """A legal 6000 × 6000 RGB PNG of zeros (about 100 kB on the wire, 108 MB decoded)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", HEAVY).save(buf, "PNG")
    return buf.getvalue()


async def slow_body(url: str) -> int:
    """Announce 1000 bytes, send 10, and wait: the status the service answers (0: none in 60 s)."""
    from urllib.parse import urlparse

    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(f"POST {u.path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: image/png\r\n"
                     "Content-Length: 1000\r\n\r\n0123456789".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 60)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else 0
    except (asyncio.TimeoutError, OSError, ValueError, IndexError):
        return 0
    finally:
        writer.close()


async def soak(url: str, health: str, bodies: list[bytes], concurrency: int, seconds: float, max_requests: int,
               hostile: float = 0.0, seed: int = 0):
    import httpx

    minutes: list[dict] = []
    current = {"lat": [], "errors": 0, "hostile": 0}
    sent = [0]
    stop_at = time.monotonic() + seconds
    bad = hostile_images() if hostile > 0 else []
    heavy = heavy_image() if hostile > 0 else b""
    draw = np.random.default_rng(seed)
    kinds = [0]  # hostile requests sent: the next one's kind is its count modulo 3

    async def user(client):
        while time.monotonic() < stop_at and sent[0] < max_requests:
            i = sent[0]
            sent[0] += 1
            is_bad = bool(bad) and draw.random() < hostile
            kind = kinds[0] % 3 if is_bad else None
            kinds[0] += is_bad
            body = bad[i % len(bad)] if kind == 0 else heavy if kind == 1 else bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                if kind == 2:
                    ok = await slow_body(url) == 408
                else:
                    r = await client.post(url, content=body, headers={"content-type": "application/octet-stream"})
                    ok = r.status_code in {0: (413,), 1: (200, 503)}.get(kind, (200,))
            except httpx.HTTPError:
                ok = False
            if not ok:
                current["errors"] += 1
            elif is_bad:
                current["hostile"] += 1
            else:
                current["lat"].append((time.perf_counter() - t0) * 1e3)

    async def clock(client):
        start = time.monotonic()
        while time.monotonic() < stop_at and sent[0] < max_requests:
            await asyncio.sleep(min(60.0, max(stop_at - time.monotonic(), 0.0)))
            done, current["lat"], errors, current["errors"] = current["lat"], [], current["errors"], 0
            refused, current["hostile"] = current["hostile"], 0
            h = (await client.get(health)).json()
            lat = np.array(done) if done else np.array([np.nan])
            row = {"minute": len(minutes) + 1, "t_s": time.monotonic() - start, "answered": len(done),
                   "hostile_refused": refused, "errors": errors, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                   "audit": h.get("status"), "rss": serve_rss(), "load": os.getloadavg()[0]}
            minutes.append(row)
            print(f"minute {row['minute']:2d}: {row['answered']} answered, {refused} hostile handled (413, 408, or 200/503 "
                  "for a heavy legal image), "
                  f"{errors} errors, p50 {row['p50']:.1f} ms, "
                  f"p99 {row['p99']:.1f} ms, audit {row['audit']}, Serve RSS {sum(row['rss'].values()):.0f} MiB "
                  f"over {len(row['rss'])} processes, load {row['load']:.2f}", flush=True)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(clock(client), *(user(client) for _ in range(concurrency)))
    return minutes, sent[0]


def main() -> int:
    ap = parser("fashion-mnist")
    ap.add_argument("--base", default="resnet10t")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-requests", type=int, default=500_000, help="a bound on the total, whatever the time")
    ap.add_argument("--audit", type=float, default=0.05)
    ap.add_argument("--hostile", type=float, default=0.0, help="fraction of requests that are hostile shapes (413)")
    args = ap.parse_args()

    import ray
    from ray import serve

    from tinysaver.selector import SelectorConfig, select
    from tinysaver.serve import ServeOptions, build_app
    from tinysaver.zoo import load_zoo

    zoo = load_zoo(args.zoo)
    sel = select(zoo, args.base, SelectorConfig()).best
    bodies, _ = encoded_images(zoo, "test", 2000)
    base = start_local_service({"soak": (build_app(sel, zoo, ServeOptions(layout="fused", num_cpus=0.5,
                                                                          audit=args.audit)), "/")})
    url, health = f"{base}/predict", f"{base}/healthz"
    start_rss = serve_rss()
    print(f"{' → '.join(sel.models)}, fused, audit {args.audit}, hostile {args.hostile}; concurrency {args.concurrency} for {args.minutes} min "
          f"(at most {args.max_requests} requests) on 127.0.0.1; load before {os.getloadavg()[0]:.2f}; Serve RSS at "
          f"start {sum(start_rss.values()):.0f} MiB over {len(start_rss)} processes", flush=True)
    minutes, sent = asyncio.run(soak(url, health, bodies, args.concurrency, args.minutes * 60, args.max_requests,
                                     args.hostile))
    serve.shutdown()
    ray.shutdown()

    first, last = minutes[0], minutes[-1]
    errors = sum(m["errors"] for m in minutes)
    print(f"\n{sent} requests sent, {sum(m['answered'] for m in minutes)} answered, "
          f"{sum(m['hostile_refused'] for m in minutes)} hostile handled as they should be, {errors} errors\n")
    table_head("| process | RSS at start MiB | after minute 1 | at the end | growth since minute 1 |")
    growth = {}
    for name in sorted(last["rss"]):
        a, b = first["rss"].get(name), last["rss"][name]
        growth[name] = (b / a - 1) if a else float("nan")
        print(f"| {name} | {start_rss.get(name, float('nan')):.0f} | {a if a else float('nan'):.0f} | {b:.0f} | "
              f"{100 * growth[name]:+.1f} % |")
    table_head("\n| minute | answered | errors | p50 ms | p99 ms | audit | load |")
    for m in minutes:
        print(f"| {m['minute']} | {m['answered']} | {m['errors']} | {m['p50']:.1f} | {m['p99']:.1f} | {m['audit']} | "
              f"{m['load']:.2f} |")
    worst = max(growth.values(), default=float("nan"))
    ratio = last["p99"] / first["p99"]
    print(f"\ngoals: errors {errors} (goal 0): {'met' if errors == 0 else 'NOT met'}; largest RSS growth since minute 1 "
          f"{100 * worst:+.1f} % (goal ≤ +10 %): {'met' if worst <= 0.10 else 'NOT met'}; p99 last / first minute "
          f"{ratio:.2f} (goal ≤ 1.5): {'met' if ratio <= 1.5 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
