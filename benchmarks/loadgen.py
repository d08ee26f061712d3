"""The serve benchmarks' shared client side: images as a client sends them, a local service, and
closed-loop load over HTTP and gRPC (one coroutine per simulated user, each sending its next
request as soon as its last one is answered, so the concurrency is exact).

Imported by bench_serve.py, bench_serve_layouts.py, bench_serve_ab.py, bench_oip.py and
soak_serve.py (run as scripts, their folder is on ``sys.path``). Load goes to 127.0.0.1 only.
"""
from __future__ import annotations

import asyncio
import io
import json
import socket
import time

import grpc
import httpx
import ray
from PIL import Image
from ray import serve

from tinysaver.data import load_dataset, raw_source, source_kind
from tinysaver.serve import local_ray_env, start_serve
from tinysaver.serve.grpc_api import METHOD


def encoded_images(zoo, split: str, n: int) -> tuple[list[bytes], object]:
    """The split's first n images as the bytes a client would send, and the decoded set."""
    uri = zoo.splits[split]["source"]
    data = load_dataset(uri, progress=False, limit=n)
    if source_kind(uri)[0].listing is None:  # held as arrays: encoded here as PNG
        out = []
        for img in data.images:
            buf = io.BytesIO()
            Image.fromarray(img[0].numpy()).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out, data
    src = raw_source(uri, n)
    return [src.read(i) for i in range(len(src.ids))], data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(num_cpus: float = 2) -> None:
    """A local Ray of ``num_cpus``, started as `tinysaver serve` starts its own (its environment
    included). ``ray.shutdown()`` ends it."""
    local_ray_env()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def start_local_ray(num_cpus: float = 2, port: int | None = None, grpc_port: int | None = None) -> int:
    """`start_ray`, and Serve listening on ``port`` of 127.0.0.1 (a free one if none); returns the
    port. ``ray.shutdown()`` ends both."""
    port = port or free_port()
    start_ray(num_cpus)
    start_serve({"host": "127.0.0.1", "port": port}, grpc_port=grpc_port)
    return port


def start_local_service(apps: dict) -> str:
    """A local Ray (2 CPUs) and Serve on a free port of 127.0.0.1 running ``apps`` ({name:
    (application, route prefix)}); returns the base URL. ``ray.shutdown()`` ends it."""
    port = start_local_ray()
    for name, (app, prefix) in apps.items():
        serve.run(app, name=name, route_prefix=prefix)
    return f"http://127.0.0.1:{port}"


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, total: int) -> tuple[float, list[dict]]:
    """Seconds to answer ``total`` requests to ``url`` from ``concurrency`` users, and each answer
    with its client-side latency (``client_ms``)."""
    results: list[dict] = []
    counter = iter(range(total))

    async def user(client):
        for i in counter:
            t0 = time.perf_counter()
            r = await client.post(url, content=bodies[i % len(bodies)],
                                  headers={"content-type": "application/octet-stream"})
            ms = (time.perf_counter() - t0) * 1e3
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.text}")
            results.append({**r.json(), "client_ms": ms})

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        return time.perf_counter() - t0, results


async def grpc_loop(target: str, bodies: list[bytes], concurrency: int, total: int,
                    method: str = METHOD) -> tuple[float, list[dict]]:
    """``closed_loop`` over gRPC: ``target`` is "host:port/application"; ``method`` takes and gives
    bytes (the service's own, whose JSON answers are kept, or another, whose are not read)."""
    address, _, app = target.partition("/")
    results: list[dict] = []
    counter = iter(range(total))
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)

        async def user():
            for i in counter:
                t0 = time.perf_counter()
                reply = await call(bodies[i % len(bodies)], metadata=(("application", app),), timeout=120)
                answer = json.loads(reply) if method == METHOD else {}
                results.append({**answer, "client_ms": (time.perf_counter() - t0) * 1e3})

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        return time.perf_counter() - t0, results


def drive(url: str, bodies: list[bytes], concurrency: int, total: int) -> tuple[float, list[dict]]:
    """One closed-loop run against an HTTP ``/predict`` URL, or a "grpc://host:port/app" target."""
    if url.startswith("grpc://"):
        return asyncio.run(grpc_loop(url[len("grpc://"):], bodies, concurrency, total))
    return asyncio.run(closed_loop(url, bodies, concurrency, total))


async def batch_loop(url: str, bodies: list[bytes], per_request: int, concurrency: int, total_images: int) -> float:
    """Images/s of ``/predict/batch`` with ``per_request`` images per multipart request."""
    n_req = max(1, total_images // per_request)
    counter = iter(range(n_req))

    async def user(client):
        for k in counter:
            files = [("files", (f"{j}.png", bodies[(k * per_request + j) % len(bodies)], "image/png"))
                     for j in range(per_request)]
            r = await client.post(url, files=files)
            if r.status_code != 200 or r.text.count("\n") != per_request or '"error"' in r.text:
                raise RuntimeError(f"{r.status_code}: {r.text[:300]}")

    async with httpx.AsyncClient(timeout=300) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        return n_req * per_request / (time.perf_counter() - t0)


def wait_up(url: str, timeout_s: float = 300) -> None:
    """Return once ``url`` answers at all; RuntimeError after ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")
