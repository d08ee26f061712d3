"""What the Open Inference Protocol costs against the service's own routes, on the same replica.

    python benchmarks/bench_oip.py --rounds 3 --images 960

One local Ray serves the default cascade of the Fashion zoo (fused layout, one replica, 1 CPU).
Each round sends the same ``--images`` Fashion test images, as the same PNG bytes, through every
route, at concurrency 1 and 32, in an interleaved order (native, protocol, native, … with the
order flipped every other round), so that a machine whose speed drifts slows both alike:

- one image per request: ``POST /predict`` (raw body) against ``POST /v2/models/{name}/infer``
  with a one-element BYTES tensor, as JSON with base64 (KServe's way) and in the binary-data
  extension (tritonclient's way);
- 16 images per request: ``POST /predict/batch`` (multipart, streamed lines) against an infer
  request of a 16-element tensor, in both encodings;
- over gRPC (Serve's gRPC proxy on the same replica): the protocol's ``ModelInfer`` (``oip-grpc``,
  images in ``raw_input_contents``, as tritonclient sends them) at 1 and 16 images per request,
  and at one image the service's own ``/tinysaver.Cascade/Predict`` (``grpc-native``).

Printed: images/s per route and concurrency (median over rounds), and the protocol's time per image
as a ratio to the native route's in the same round (goal ≤ 1.1): over HTTP, to the native HTTP
route's; ``oip-grpc`` to ``grpc-native``'s at one image and to ``/predict/batch``'s at 16. The load generator is a closed
loop on httpx, as ``bench_serve.py``'s; ``perf_analyzer``, Triton's load tool for the protocol, is
not on PyPI.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import struct
import time

from loadgen import encoded_images, free_port, grpc_loop, start_local_ray
from common import table_head


# the routes of each request size, and what each is compared with (itself: a reference)
ROUTES = {1: ["native", "oip-json", "oip-binary", "grpc-native", "oip-grpc"],
          16: ["native", "oip-json", "oip-binary", "oip-grpc"]}
REFERENCE = {**{(r, p): "native" for p in (1, 16) for r in ROUTES[p]},
             ("grpc-native", 1): "grpc-native", ("oip-grpc", 1): "grpc-native"}


def binary_infer(images: list[bytes]) -> tuple[bytes, dict]:
    head = json.dumps({"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": sum(4 + len(x) for x in images)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    blob = b"".join(struct.pack("<I", len(x)) + x for x in images)
    return head + blob, {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def json_infer(images: list[bytes]) -> tuple[bytes, dict]:
    body = {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                        "data": [base64.b64encode(x).decode() for x in images]}]}
    return json.dumps(body).encode(), {"content-type": "application/json"}


def multipart(images: list[bytes]) -> tuple[bytes, dict]:
    b = "tinysaverbench"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + x + b"\r\n" for i, x in enumerate(images)]
    return b"".join(parts) + f"--{b}--\r\n".encode(), {"content-type": f"multipart/form-data; boundary={b}"}


def requests_for(route: str, bodies: list[bytes], per: int) -> list[tuple[bytes, dict]]:
    groups = [bodies[i:i + per] for i in range(0, len(bodies) - per + 1, per)]
    if route == "native":
        return [(g[0], {"content-type": "image/png"}) for g in groups] if per == 1 else [multipart(g) for g in groups]
    return [(json_infer if route == "oip-json" else binary_infer)(g) for g in groups]


def grpc_requests(route: str, bodies: list[bytes], per: int, model: str) -> list[bytes]:
    """Serialized request messages: the image itself for ``grpc-native``, a ``ModelInferRequest`` else."""
    if route == "grpc-native":
        return list(bodies)
    from tinysaver.serve import oip_grpc

    out = []
    for i in range(0, len(bodies) - per + 1, per):
        m = oip_grpc.messages().ModelInferRequest(model_name=model)
        m.inputs.add(name="image", datatype="BYTES", shape=[per])
        m.raw_input_contents.append(b"".join(struct.pack("<I", len(x)) + x for x in bodies[i:i + per]))
        out.append(m.SerializeToString())
    return out


async def closed_loop(url: str, reqs: list[tuple[bytes, dict]], concurrency: int) -> float:
    import httpx

    todo = iter(reqs)

    async def user(client):
        for body, headers in todo:
            r = await client.post(url, content=body, headers=headers)
            if r.status_code != 200 or b'"error"' in r.content[:2000]:
                raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=960, help="images per route, concurrency and round")
    args = ap.parse_args()

    import ray
    from ray import serve

    from tinysaver.serve import ServeOptions, build_app
    from tinysaver.serve.grpc_api import METHOD
    from tinysaver.serve.oip_grpc import SERVICE
    from tinysaver.serve.oip import model_name
    from tinysaver.selector import SelectorConfig, select
    from tinysaver.zoo import load_zoo

    zoo = load_zoo("fashion-mnist")
    sel = select(zoo, "resnet10t", SelectorConfig()).best
    bodies, _ = encoded_images(zoo, "test", args.images)
    gport = free_port()
    base = f"http://127.0.0.1:{start_local_ray(grpc_port=gport)}"
    serve.run(build_app(sel, zoo, ServeOptions(layout="fused", num_cpus=1.0)), name="oip", route_prefix="/")
    name = model_name(sel.base)
    urls = {("native", 1): f"{base}/predict", ("native", 16): f"{base}/predict/batch"}
    for route in ("oip-json", "oip-binary"):
        for per in (1, 16):
            urls[(route, per)] = f"{base}/v2/models/{name}/infer"
    target = f"127.0.0.1:{gport}/oip"  # the application, as loadgen's gRPC loop names it
    methods = {"grpc-native": METHOD, "oip-grpc": f"/{SERVICE}/ModelInfer"}

    def run(route: str, per: int, conc: int) -> tuple[int, float]:
        if route in methods:
            reqs = grpc_requests(route, bodies, per, name)
            return len(reqs), asyncio.run(grpc_loop(target, reqs, conc, len(reqs), methods[route]))[0]
        reqs = requests_for(route, bodies, per)
        return len(reqs), asyncio.run(closed_loop(urls[(route, per)], reqs, conc))

    asyncio.run(closed_loop(urls[("native", 1)], requests_for("native", bodies[:64], 1), 8))  # warm-up
    asyncio.run(grpc_loop(target, grpc_requests("oip-grpc", bodies[:64], 1, name), 8, 64, methods["oip-grpc"]))
    print(f"{' → '.join(sel.models)}, fused, 1 replica; {args.images} images per run; load "
          f"{os.getloadavg()[0]:.2f} before", flush=True)
    rate: dict = {}
    ratio: dict = {}
    for rnd in range(args.rounds):
        for per in (1, 16):
            for conc in (1, 32):
                order = ROUTES[per]
                if rnd % 2:
                    order = order[::-1]
                secs = {}
                for route in order:
                    n, secs[route] = run(route, per, conc)
                    rate.setdefault((route, per, conc), []).append(n * per / secs[route])
                for route in order:
                    if REFERENCE[route, per] != route:
                        ratio.setdefault((route, per, conc), []).append(secs[route] / secs[REFERENCE[route, per]])
        print(f"round {rnd + 1} done, load {os.getloadavg()[0]:.2f}", flush=True)
    serve.shutdown()
    ray.shutdown()
    table_head("\n| images per request | concurrency | route | images/s (median) | time per image / reference's |")
    for per in (1, 16):
        for conc in (1, 32):
            for route in ROUTES[per]:
                r = ratio.get((route, per, conc))
                shown = ("1 (reference)" if r is None else
                         f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f}) of {REFERENCE[route, per]}")
                print(f"| {per} | {conc} | {route} | {statistics.median(rate[(route, per, conc)]):.1f} | {shown} |")
    for per in (1, 16):  # the protocol over gRPC against the same protocol over HTTP (binary, its lighter form)
        for conc in (1, 32):
            g, h = (statistics.median(rate[(r, per, conc)]) for r in ("oip-grpc", "oip-binary"))
            print(f"{per} per request, concurrency {conc}: oip-grpc {g:.1f} img/s = {g / h:.2f}× oip-binary over HTTP")
    worst = max(statistics.median(v) for v in ratio.values())
    print(f"\ngoal: the protocol's time per image ≤ 1.1 × the native route's: worst median {worst:.2f}, "
          f"{'met' if worst <= 1.1 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
