"""The service's HTTP parts without Ray: bodies, multipart, decoding refusals, tokens, streamed
answers, gRPC."""
import asyncio
import json
import sys
import time

import numpy as np
import pytest

from tests.helpers import png_bytes
from tinysaver.serve import BadRequest
from tinysaver.serve.http import check_token, decode, decode_all, ndjson_as_ready, read_files


class FakeRequest:
    """What the routes read of a starlette Request: headers, the body stream and the form."""

    def __init__(self, body: bytes, ctype: str, length: bool = True, encoding: str | None = None):
        self.headers = {"content-type": ctype, **({"content-length": str(len(body))} if length else {}),
                        **({"content-encoding": encoding} if encoding else {})}
        self._raw = body

    async def stream(self):
        for i in range(0, len(self._raw), 7):
            yield self._raw[i:i + 7]

    async def form(self):
        from starlette.requests import Request

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", self.headers["content-type"].encode())]}

        async def receive():
            return {"type": "http.request", "body": self._body, "more_body": False}

        return await Request(scope, receive).form()


def multipart(files, boundary="XyZ"):
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"; filename="{n}"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + d + b"\r\n" for i, (n, d) in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_bodies_raw_multipart_and_every_refusal_in_one_sentence():
    pytest.importorskip("starlette")
    img = png_bytes(np.zeros((8, 8), np.uint8))
    assert asyncio.run(read_files(FakeRequest(img, "image/png"), False, 10_000)) == [("body", img)]
    body, ctype = multipart([("a.png", img), ("b.png", img)])
    assert [n for n, _ in asyncio.run(read_files(FakeRequest(body, ctype), True, 10_000))] == ["a.png", "b.png"]
    cases = [(FakeRequest(body, ctype), False, 10_000, 400, "/predict takes one image, the form holds 2 files"),
             (FakeRequest(img, "image/png"), False, 10, 413, "over the limit of 10 bytes"),
             (FakeRequest(img, "image/png", length=False), False, 10, 413, "over the limit"),
             (FakeRequest(img, "text/plain"), False, 10_000, 415, "application/octet-stream"),
             (FakeRequest(img, "image/png"), True, 10_000, 415, "multipart/form-data"),
             (FakeRequest(b"abc", "multipart/form-data"), False, 10_000, 400, "malformed multipart body (Missing boundary"),
             (FakeRequest(b"--XyZ\r\nno headers here\r\n\r\nabc\r\n--XyZ--", "multipart/form-data; boundary=XyZ"), False,
              10_000, 400, "malformed multipart body"),
             (FakeRequest(b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ"), False, 10_000, 400, "no file")]
    for req, many, limit, status, words in cases:
        with pytest.raises(BadRequest) as e:
            asyncio.run(read_files(req, many, limit))
        assert e.value.status == status and words in e.value.reason and "\n" not in e.value.reason, e.value.reason


def test_decoding_refusals_name_the_problem_not_the_decoder():
    from PIL import Image
    import io

    for data, status, words in [(b"", 400, "empty body"), (b"GIF89a broken", 400, "not a usable image"),
                                (png_bytes(np.zeros((8, 8), np.uint8))[:30], 400, "not a usable image")]:
        with pytest.raises(BadRequest) as e:
            decode(data, 1000)
        assert e.value.status == status and words in e.value.reason and "0x" not in e.value.reason
    buf = io.BytesIO()
    Image.new("L", (400, 300)).save(buf, format="PNG")
    with pytest.raises(BadRequest) as e:
        decode(buf.getvalue(), 100_000)
    assert e.value.status == 413 and "400 × 300 pixels is over the cap" in e.value.reason
    assert decode(buf.getvalue(), None).shape == (1, 300, 400)


def test_a_token_is_required_when_set():
    check_token({}, None)
    check_token({"authorization": "Bearer s3cret"}, "s3cret")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
        with pytest.raises(BadRequest) as e:
            check_token(headers, "s3cret")
        assert e.value.status == 401


def test_a_streamed_batch_writes_each_answer_when_it_is_ready():
    """/predict/batch's lines come in the order the answers finish (here: 2, 0, 3, 1), each one
    written before the next answer is ready, not in the order the images were sent."""
    async def main():
        events = [asyncio.Event() for _ in range(4)]

        async def answer(i):
            await events[i].wait()
            return {"index": i}

        stream = ndjson_as_ready(answer(i) for i in range(4))
        got = []
        for i in (2, 0, 3, 1):  # only answer i can finish: a stream in index order would wait here
            events[i].set()
            got.append(json.loads(await asyncio.wait_for(stream.__anext__(), 5))["index"])
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return got

    assert asyncio.run(main()) == [2, 0, 3, 1]


def test_answers_that_finish_together_stream_as_one_chunk_in_the_order_asked():
    async def main():
        gate = asyncio.Event()

        async def answer(i):
            if i in (1, 3):
                await gate.wait()
            return {"index": i}

        stream = ndjson_as_ready(answer(i) for i in range(4))
        chunks = [await asyncio.wait_for(stream.__anext__(), 5)]
        gate.set()
        chunks.append(await asyncio.wait_for(stream.__anext__(), 5))
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return [[json.loads(line)["index"] for line in c.splitlines()] for c in chunks]

    assert asyncio.run(main()) == [[0, 2], [1, 3]]


def test_streamed_lines_say_what_went_wrong_and_time_out_at_the_deadline():
    """``line`` turns each outcome into its line: a result, a refusal, a failure, or no answer in time."""
    async def main():
        loop = asyncio.get_running_loop()
        ok, refused, failed, never = (loop.create_future() for _ in range(4))
        ok.set_result(7)
        refused.set_exception(BadRequest(400, "not a usable image"))
        failed.set_exception(RuntimeError("boom"))

        def line(k, outcome):
            return {"k": k, "got": outcome if isinstance(outcome, int) else type(outcome).__name__}

        chunks = [c async for c in ndjson_as_ready([ok, refused, failed, never], line, timeout_s=0.2)]
        return [[json.loads(x) for x in c.splitlines()] for c in chunks], never.cancelled()

    chunks, cancelled = asyncio.run(main())
    assert chunks == [[{"k": 0, "got": 7}, {"k": 1, "got": "BadRequest"}, {"k": 2, "got": "RuntimeError"}],
                      [{"k": 3, "got": "TimeoutError"}]]
    assert cancelled  # the engine skips an answer nobody waits for


def test_a_batch_of_bodies_decodes_each_and_keeps_the_refusal_of_a_bad_one():
    good = png_bytes(np.zeros((8, 8, 3), np.uint8))
    out = decode_all([good, b"junk", b""], None)
    assert tuple(out[0].shape) == (3, 8, 8)
    assert [type(x).__name__ for x in out[1:]] == ["BadRequest", "BadRequest"] and out[2].status == 400


def test_the_grpc_method_is_registered_under_its_name_and_replies_with_bytes():
    """What Serve's gRPC proxy gets from ``add_servicer``, and what its replica serializes."""
    grpc = pytest.importorskip("grpc")
    from tinysaver.serve import grpc_api

    class Server:
        def add_generic_rpc_handlers(self, handlers):
            self.handlers = handlers

    class Servicer:
        def Predict(self, data, context):  # noqa: N802
            return grpc_api.reply({"class": 3})

    server = Server()
    grpc_api.add_servicer(Servicer(), server)
    [handler] = server.handlers
    details = type("Details", (), {"method": grpc_api.METHOD, "invocation_metadata": ()})()
    method = handler.service(details)
    assert method is not None and method.request_deserializer is None  # the replica gets the raw bytes
    assert json.loads(method.unary_unary(b"png", None).SerializeToString()) == {"class": 3}
    assert all(hasattr(grpc.StatusCode, name) for name in grpc_api.STATUS.values())


def test_the_pixel_pool_is_one_budget_across_requests():
    """Decoded pixels in flight are counted per process: a reservation that does not fit beside the
    others waits (False: the route answers 503), and one over the whole pool is a 413 for good."""
    import threading

    from tinysaver.budget import PixelPool
    from tinysaver.errors import PixelCapError

    pool = PixelPool(1000)
    assert pool.take(600) and not pool.take(500) and pool.take(400)
    pool.give(600)
    assert pool.take(500) and pool.held == 900
    with pytest.raises(PixelCapError, match="over this process's budget of 1,000"):
        pool.take(1001)
    pool.give(900)
    taken = []
    threads = [threading.Thread(target=lambda: taken.append(pool.take(10))) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert taken.count(True) == 100 and pool.held == 1000  # never over, whatever the interleaving


class StalledRequest(FakeRequest):
    """A client that sends 10 of the 1000 bytes it announced, then nothing."""

    async def stream(self):
        yield self._raw[:10]
        await asyncio.sleep(3600)


def test_an_unfinished_body_gets_408_at_the_body_timeout_and_a_bad_length_is_ignored():
    from tinysaver.serve.http import read_body

    req = StalledRequest(b"x" * 1000, "image/png")
    with pytest.raises(BadRequest) as e:
        asyncio.run(read_body(req, 10_000, timeout_s=0.2))
    assert e.value.status == 408 and e.value.reason == "the body did not arrive whole within 0.2 s"
    odd = FakeRequest(b"abc", "image/png")
    odd.headers["content-length"] = "\u00b2"  # str.isdigit() takes a superscript two; int() does not
    assert asyncio.run(read_body(odd, 10)) == b"abc"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the listener is found and closed through Linux's /proc")
def test_closing_a_listener_refuses_new_connections_and_answers_the_open_ones():
    """What a stop does to the proxy before its node goes: another process's listener (here a child
    that answers one line per connection) stops taking connections, while a connection it already
    accepted is still answered. Before, the proxy was killed with requests in it."""
    import socket
    import subprocess

    from tinysaver.serve import listener

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ("import socket, threading\n"
              f"s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', {port}))\n"
              "s.listen(); print('up', flush=True)\n"
              "def answer(c):\n"
              "    with c: c.sendall(c.recv(100).upper())\n"
              "while True:\n"
              "    c, _ = s.accept(); threading.Thread(target=answer, args=(c,)).start()\n")
    child = subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "up"
        held = socket.create_connection(("127.0.0.1", port), timeout=10)  # accepted before the close
        for _ in range(100):
            if listener.connections(port):
                break
            time.sleep(0.05)
        assert listener.connections(port) == 1
        assert listener.close_listener([child.pid], port) == 1
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"ping")
        assert held.recv(100) == b"PING"  # the open connection is answered
        held.close()
        assert listener.settle(port, 10.0) == 0
        assert listener.close_listener([child.pid], port) == 0  # nothing listens any more
    finally:
        child.kill()
        child.wait()


def test_the_ingress_answers_exactly_the_route_table_and_the_token_is_one_dependency():
    """Routes are declared once (`routes.ROUTES`): the deployment registers them from the table, the
    start-up line lists them from it, and each route that asks for the token has the one dependency."""
    pytest.importorskip("ray.serve")
    from tinysaver.serve import deployments, routes

    def walk(rs):  # Serve moves a class's routes into an included router
        for r in rs:
            inner = getattr(r, "original_router", None)
            yield from walk(inner.routes) if inner is not None else [r]

    served = {(m, r.path): r for r in walk(deployments.api.routes) if hasattr(r, "methods") and r.path in
              {x.path for x in routes.ROUTES} for m in r.methods}
    assert set(served) == {(r.method, r.path) for r in routes.ROUTES}
    for r in routes.ROUTES:
        route = served[(r.method, r.path)]
        assert route.endpoint.__name__ == r.handler
        deps = [d.call for d in route.dependant.dependencies]
        assert (deployments._authorized in deps) == r.token, r.path
    assert routes.listing().startswith("POST /predict, /predict/batch, GET /healthz")
    assert "/metrics" in routes.with_token() and "/healthz" not in routes.with_token()


def test_the_token_dependency_refuses_in_the_service_error_shape():
    pytest.importorskip("ray.serve")
    from starlette.exceptions import HTTPException

    from tinysaver.serve import deployments

    class Req:
        def __init__(self, auth):
            self.headers = {"authorization": auth} if auth else {}

    deployments.REPLICA_TOKEN[0] = "s3cret"
    asyncio.run(deployments._authorized(Req("Bearer s3cret")))
    for bad in (None, "Bearer nope", "Basic s3cret"):
        with pytest.raises(HTTPException) as e:
            asyncio.run(deployments._authorized(Req(bad)))
        assert e.value.status_code == 401 and "Authorization: Bearer" in e.value.detail
    deployments.REPLICA_TOKEN[0] = None
    asyncio.run(deployments._authorized(Req(None)))  # no token set: open


def test_compressed_bodies_are_inflated_within_the_size_limit():
    """Content-Encoding gzip and deflate (with zlib's header or raw), and the two chained, give the
    image back; a bomb is refused with 413 as soon as its output passes the limit, a cut or mislabelled
    stream with 400, and a coding the service cannot undo with 415."""
    import gzip
    import zlib

    img = png_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8))
    raw_deflate = zlib.compressobj(wbits=-15)
    plain = {"gzip": gzip.compress(img), "x-gzip": gzip.compress(img), "deflate": zlib.compress(img),
             "identity, deflate": raw_deflate.compress(img) + raw_deflate.flush(),
             "gzip, deflate": zlib.compress(gzip.compress(img))}
    for coding, body in plain.items():
        assert asyncio.run(read_files(FakeRequest(body, "image/png", encoding=coding), False, 10_000)) == \
            [("body", img)], coding
    bomb = gzip.compress(b"\0" * 5_000_000)  # 5 MB of zeros in about 5 kB
    cases = [(bomb, "gzip", 413, "inflates past the limit of 10,000 bytes"),
             (gzip.compress(img)[:-9], "gzip", 400, "cut short"),
             (gzip.compress(img) + b"junk", "gzip", 400, "bytes after its end"),
             (img, "gzip", 400, "is not gzip data"),
             (gzip.compress(img), "br", 415, "Content-Encoding 'br' is not supported")]
    for body, coding, status, words in cases:
        with pytest.raises(BadRequest) as e:
            asyncio.run(read_files(FakeRequest(body, "image/png", encoding=coding), False, 10_000))
        assert e.value.status == status and words in e.value.reason and "\n" not in e.value.reason, e.value.reason


def test_the_port_goes_to_the_proxy_only_once_the_proxy_answers_and_without_a_gap():
    """Serve's proxy binds the port with SO_REUSEPORT beside the start-up server. Every connection
    stays with the start-up server until the hand-over's check gets the proxy's own answer through
    the port; from then on every connection reaches the proxy. A check that reaches no other server
    (the start-up server's own answer) or a failing one keeps the port where it was."""
    import socket
    import threading
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.helpers import free_port
    from tinysaver.serve.lifecycle import _proxy_answers
    from tinysaver.serve.starting import STARTING_HEADER, StartingServer

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"proxy")

        def log_message(self, *a):
            pass

    port = free_port()
    url = f"http://127.0.0.1:{port}/livez"

    def who(n: int = 24) -> set:
        out = set()
        for _ in range(n):
            with urllib.request.urlopen(url, timeout=10) as r:
                out.add("starting" if STARTING_HEADER in r.headers else r.read().decode())
        return out

    with StartingServer("127.0.0.1", port, share=True) as starting:
        assert starting.shared  # Linux: the port's group is steered
        assert not starting.hand_over(lambda: _proxy_answers(url)) and who() == {"starting"}  # nobody else listens
        proxy = ThreadingHTTPServer(("127.0.0.1", port), Proxy, bind_and_activate=False)
        proxy.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        proxy.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as Serve's proxy binds
        proxy.server_bind()
        proxy.server_activate()
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            assert who() == {"starting"}  # the proxy listens, and gets nothing yet
            assert not starting.hand_over(lambda: False) and who() == {"starting"}
            assert starting.hand_over(lambda: _proxy_answers(url), settle_s=0.05)
            assert not starting.thread.is_alive() and who() == {"proxy"}
        finally:
            proxy.shutdown()
            proxy.server_close()


def test_the_port_answers_liveness_while_ray_starts_and_is_free_after():
    """What `tinysaver serve` holds its port with until Serve's proxy takes it: the liveness routes
    200, everything else 503 with Retry-After in the service's error shape; closed, the port is free."""
    import socket
    import urllib.error
    import urllib.request

    from tests.helpers import free_port
    from tinysaver.serve.starting import STARTING, WAITING, StartingServer

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with StartingServer("127.0.0.1", port):
        for path, body in (("/livez", {"status": "live"}), ("/v2/health/live", {"live": True})):
            with urllib.request.urlopen(url + path, timeout=10) as r:
                assert r.status == 200 and json.loads(r.read()) == body, path
        for req in (urllib.request.Request(url + "/v2/health/ready"), urllib.request.Request(url + "/readyz"),
                    urllib.request.Request(url + "/predict", data=b"x", method="POST")):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 503 and e.value.headers["Retry-After"] == "1", req.full_url
            assert json.loads(e.value.read()) == {"error": STARTING}
        with pytest.raises(urllib.error.HTTPError) as e:  # the shape the ingress's /healthz has while starting
            urllib.request.urlopen(url + "/healthz", timeout=10)
        assert e.value.code == 503 and json.loads(e.value.read()) == WAITING
    with socket.socket() as s:  # free again, for the proxy (which binds with SO_REUSEADDR, as servers do)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    # loaded before the command's local Ray is set up: a Ray imported then broke the driver's token
    import subprocess

    done = subprocess.run([sys.executable, "-c", "import sys, tinysaver.serve.starting; print('ray' in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stdout + done.stderr
