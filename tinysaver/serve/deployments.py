"""The Serve deployments, at module level, each bound by keyword to one frozen `ServiceSpec`.

- ``Ingress`` (FastAPI routes, the audit, metrics). In the ``fused`` layout its replicas hold every
  stage and answer each batch (``batching.Batcher``) on the shared engine (one hop from Serve's proxy).
  In ``per-stage`` it walks the ``StageServer`` deployments it is given, one request at a time.
- ``StageServer``: one stage of a ``per-stage`` spec, batching its requests the same way.

The routes are those of `tinysaver.serve.routes.ROUTES`, registered from that table onto the
ingress's handlers, with the token as one FastAPI dependency where a route asks for it. Every
refusal has the body ``{"error": reason}``.
"""
# No ``from __future__ import annotations``: FastAPI reads the route signatures at definition time.
import asyncio
import contextlib
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

import grpc
import ray
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException
from starlette.middleware.gzip import DEFAULT_EXCLUDED_CONTENT_TYPES, GZipMiddleware

from .. import __version__
from ..budget import InputBudget, PixelPool
from ..decoding import header_pixels
from ..errors import PixelCapError
from ..limits import MAX_PIXELS_IN_FLIGHT
from . import drain, grpc_api, oip, oip_grpc, prom
from .adapt import ThresholdAdapter
from .fused import FusedAnswerer
from .audit import AuditMonitor
from .batching import Batcher
from .http import OVERLOADED, BadRequest, check_size, check_token, decode, decode_all, ndjson_as_ready, read_body, read_files
from .options import GRACEFUL_SHUTDOWN_S, ServiceSpec
from .routes import ROUTES
from .per_stage import ItemStage, WalkAnswerer
from .stages import load_stages, stage_device

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
GEAR_HEADER = "X-Tinysaver-Gear"  # with --gears, the gear that answered a /predict request
INLINE_DECODE_PIXELS = 128 * 128  # an image this small is decoded on the event loop (`IngressServer._image`)
# a dead replica, or a deployment Serve is replacing or deleting (no replica, back-pressure, a
# cancelled call): a retry may find a new replica, else the client is told to retry. Seen under
# load while the app was deleted, where these had come back as HTTP 500.
DEAD = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, RayServeException)

try:  # Swagger UI's files from a package, not a CDN: the API page works offline
    from fastapi_offline import __file__ as _offline

    SWAGGER_UI = Path(_offline).parent / "static"
except ImportError:  # without it, FastAPI's page, which loads Swagger UI from a CDN
    SWAGGER_UI = None
api = FastAPI(title="tinysaver cascade", docs_url=None if SWAGGER_UI else "/docs", redoc_url=None)
# The routes read their bodies themselves (to cap their size while reading), so FastAPI cannot infer
# them: the schema says what they take, for clients and for fuzzers driven by the schema.
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ONE_IMAGE = {"requestBody": {"required": True, "content": {
    "image/png": _BINARY, "image/jpeg": _BINARY, "application/octet-stream": _BINARY,
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}}}}
_IMAGES = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}

# the protocol's infer request, in the part that this model reads (see tinysaver.serve.oip)
_OIP_INFER = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
            "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"}, "data": {"type": "array", "items": {"type": "string"}}}}},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}}}}}}}}


@api.exception_handler(HTTPException)
async def _http_error(request, exc):  # unknown routes and methods: the service's own error shape
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@api.exception_handler(Exception)
async def _bug(request, exc):  # a bug still answers in the service's JSON shape, never plain-text 500
    return JSONResponse({"error": f"internal error ({type(exc).__name__}): a bug in tinysaver, please report it"},
                        status_code=500)


class _CountRequests:
    """Requests by route template and status, for /metrics, as a plain ASGI middleware: Starlette's
    ``@app.middleware("http")`` races every read of the body against a disconnect in a task group of
    its own, which took a tenth of the replica's Python time under /predict/batch
    (benchmarks/profile_replica.py)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]  # what the client gets when the app raises: the error handler's answer

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:  # the router wrote the matched route into this same scope
            prom.HTTP_REQUESTS.labels(getattr(scope.get("route"), "path", "unmatched"), str(status[0])).inc()


api.add_middleware(_CountRequests)
# answers compressed for a client that sends Accept-Encoding: gzip (httpx and browsers do), past 1 kB:
# the protocol's and /metrics' larger bodies. Not the streamed lines of /predict/batch: each is
# flushed on its own, small, so gzip would cost CPU per line for little
api.add_middleware(GZipMiddleware, minimum_size=1024,  # exclude_content_types: Starlette ≥ 1.5
                   exclude_content_types=(*DEFAULT_EXCLUDED_CONTENT_TYPES, "application/x-ndjson"))
if SWAGGER_UI:
    api.mount("/docs/static", StaticFiles(directory=SWAGGER_UI), name="swagger-ui")

    @api.get("/docs", include_in_schema=False)
    async def _docs(request: Request):
        """The API page, its script and style served from this service (behind a route prefix too)."""
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=root + api.openapi_url, title=f"{api.title}: API",
                                   swagger_js_url=f"{root}/docs/static/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs/static/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs/static/favicon.png")


@api.exception_handler(RequestValidationError)
async def _validation_error(request, exc):
    return JSONResponse({"error": "malformed request: " + "; ".join(str(e.get("msg")) for e in exc.errors())[:300]},
                        status_code=400)


@serve.deployment(graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)
class StageServer:
    """Stage ``index`` of ``spec`` (per-stage layout): (image, carry) items → (class, confidence, carry)."""

    def __init__(self, spec: ServiceSpec, index: int):
        num_gpus = spec.options.per_stage("num_gpus", len(spec.stages.names))[index]
        self.device = stage_device(num_gpus)
        self.run = ItemStage(load_stages(spec, self.device, [index])[index], self.device)
        self.batches = Batcher(self._classify, spec.options.max_batch_size, spec.options.batch_wait_timeout_s)
        self.hist = metrics.Histogram("tinysaver_stage_batch_size", description="requests per stage batch",
                                      boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("stage",))
        self.hist.set_default_tags({"stage": spec.stages.names[index]})

    async def classify(self, item: tuple) -> tuple:
        """One request's (image, carry) → (class, confidence, carry), run in a batch."""
        return await self.batches(item)

    async def _classify(self, items: list) -> list:
        self.hist.observe(len(items))
        return await asyncio.to_thread(self.run, items)

    def stats(self) -> dict:
        return {"batch_sizes": {int(k): v for k, v in sorted(self.batches.sizes.items())}, "pid": os.getpid(),
                "device": self.device}


class IngressServer:
    """The routes. ``stages``: the per-stage layout's StageServer handles, in running order; none in
    the fused layout, where this replica loads every stage itself."""

    def __init__(self, spec: ServiceSpec, stages: list | None = None, token: str | None = None):
        o = spec.options
        self.spec, self.o, self.names = spec, o, list(spec.stages.names)
        REPLICA_TOKEN[0] = token  # what every route and the gRPC method check: one ingress per replica process
        self.class_names = list(spec.stages.class_names) if spec.stages.class_names else None
        self.budget = InputBudget(o.max_pixels, spec.stages.preprocess)
        # decoded pixels held at once across every request of this replica (one image always fits)
        self.pixels = PixelPool(max(MAX_PIXELS_IN_FLIGHT, o.max_pixels or 0))
        self.oip_name = oip.model_name(spec.stages.names[-1])  # the Open Inference Protocol's name for the cascade
        # one answerer per layout, holding the live thresholds (tinysaver.serve.fused, tinysaver.serve.per_stage)
        self.answerer = (WalkAnswerer(spec, stages, DEAD) if stages else
                         FusedAnswerer(spec, lambda: self.incoming))
        self.rng = random.Random(o.seed)
        self.incoming = 0  # images read or decoded now, not yet handed to a stage
        self.requests = 0
        self.exits = Counter()
        self.latency = Counter()
        self.latency_ms = 0.0  # summed over answered images, with the time of the last (Triton's statistics)
        self.last_answer_s = 0.0
        self.timing: Counter = Counter()  # seconds summed over answered /predict requests
        self.timed = 0
        # --adapt: the monitor of the threshold in use, which it retunes (a saver → base pair)
        self.audit = (ThresholdAdapter(spec.stages.thresholds[0], o.audit, o.delta, o.audit_tolerance, seed=o.seed)
                      if o.adapt else AuditMonitor(o.audit, o.delta, o.audit_tolerance))
        self.gear_audits: dict[int, AuditMonitor] = {}  # --gears: one monitor per gear seen
        self._tasks: set = set()
        # a stop: new requests get 503 once the command that runs the service asks (serve.drain),
        # and the requests already admitted are counted until answered, so that it knows when to go
        ctx = serve.get_replica_context()
        self.app_name, self.replica = ctx.app_name, ctx.replica_id.unique_id
        self.draining, self.held, self._watch = False, 0, None
        self.m_requests = metrics.Counter("tinysaver_requests", description="answered images")
        self.m_exits = metrics.Counter("tinysaver_exits", description="answers per stage", tag_keys=("stage",))
        self.m_latency = metrics.Histogram("tinysaver_latency_ms", description="server-side latency",
                                           boundaries=list(LATENCY_BUCKETS_MS))
        self.m_bound = metrics.Gauge("tinysaver_audit_loss_upper_points",
                                     description="anytime-valid upper bound on the accuracy given up (points)")

    def _keep(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # a task nobody holds may be collected before it runs
        task.add_done_callback(self._tasks.discard)

    # --- one request ---------------------------------------------------------------------------
    async def _answer(self, img) -> dict:
        t0 = time.perf_counter()
        return self._record(img, t0, *await self.answerer.answer(img))

    def _record(self, img, t0: float, i: int, pred, conf, carry, first, gear=None) -> dict:
        """Count an answered image, audit it if drawn, and give its answer's JSON fields."""
        ms = (time.perf_counter() - t0) * 1e3
        early = i < len(self.names) - 1
        audit = early and self.o.audit > 0 and self.rng.random() < self.o.audit
        if self.o.adapt:
            record = self.audit.request(early, audit, *first, None if early else int(pred))
            self.answerer.set_threshold(0, self.audit.threshold)
        else:
            record = self.audit.request(early, audit)
        records = [(self.audit, record)]
        if gear is not None:  # each gear's answers are audited on their own as well
            monitor = self.gear_audits.setdefault(gear, AuditMonitor(self.o.audit, self.o.delta,
                                                                     self.o.audit_tolerance))
            records.append((monitor, monitor.request(early, audit)))
        if audit:
            self._keep(self._audit(img, pred, records, i, carry))  # after the answer: the client never waits
        self.requests += 1
        self.exits[i] += 1
        self.latency[next((b for b in LATENCY_BUCKETS_MS if ms <= b), "inf")] += 1
        self.latency_ms += ms
        self.last_answer_s = time.time()
        self.m_requests.inc()
        self.m_exits.inc(tags={"stage": self.names[i]})
        self.m_latency.observe(ms)
        prom.LATENCY.observe(ms / 1e3)
        out = {"class": int(pred), "name": self.class_names[int(pred)] if self.class_names else None,
               "confidence": float(conf), "exit_stage": i, "stage_name": self.names[i],
               "latency_ms": round(ms, 3)}
        if gear is not None:
            out["gear"] = gear
        return out

    async def _audit(self, img, pred: int, records: list, answered: int, carry) -> None:
        """The base's answer for an audited image, given to every monitor that counted it (the
        service's, and its gear's)."""
        try:
            base_pred = await self.answerer.base_answer(img, answered, carry)
        except BadRequest:
            for monitor, record in records:
                monitor.dropped(record)
            return
        for monitor, record in records:
            monitor.audited(record, base_pred != pred)
        if self.o.adapt:
            self.answerer.set_threshold(0, self.audit.threshold)
        gearing = self.answerer.gearing
        if gearing is not None and any(m.state == "drift" for m, _ in records):
            gearing.forced = True  # a drift alarm holds the zero-loss gear from here on

    async def _image(self, data: bytes, pixels: int):
        """``data`` decoded (`http.decode`), ``pixels`` being its header's count: a small image on
        the event loop, since the hop to a thread costs more CPU than its decoding (measured: a
        28×28 PNG 40 µs inline, 149 µs through ``asyncio.to_thread``; a 128×128 one 121 and 265),
        and a larger one in a thread, so that the loop goes on serving meanwhile."""
        if 0 < pixels <= INLINE_DECODE_PIXELS:  # 0: a header it could not read, left to the thread
            return decode(data, self.budget)
        return await asyncio.to_thread(decode, data, self.budget)

    def _reserve(self, datas) -> int:
        """Reserve the decoded pixels of ``datas`` (read from their headers) in the replica's pool:
        413 for more than the whole pool, 503 while it is full. Returns what to give back."""
        n = sum(map(header_pixels, datas))
        try:
            ok = self.pixels.take(n)
        except PixelCapError as e:
            raise BadRequest(413, str(e)) from None
        if not ok:
            raise BadRequest(503, f"busy: this replica holds its limit of decoded pixels ({self.pixels.capacity:,}); "
                                  "retry shortly")
        return n

    @contextlib.contextmanager
    def _holding(self, datas):
        """Their pixels held in the pool while inside; gives their count."""
        n = self._reserve(datas)
        try:
            yield n
        finally:
            self.pixels.give(n)

    def _check_count(self, n: int) -> None:
        if n > self.o.max_images:  # one request may not hold the replica for everyone else
            raise BadRequest(413, f"the request holds {n:,} images, over the limit of {self.o.max_images:,} per "
                                  "request (--max-images); send several requests")

    @contextlib.contextmanager
    def _on_its_way(self):
        """A request being read or decoded, which the fused batch waits for (``self.incoming``)."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    @staticmethod
    def _error(e: BadRequest) -> JSONResponse:
        headers = {"Retry-After": str(drain.RETRY_AFTER_S)} if e.status == 503 else {}
        if e.reason.endswith(drain.DRAINING):  # the client reconnects, and so never sits in a proxy being stopped
            headers["Connection"] = "close"
        return JSONResponse({"error": e.reason}, status_code=e.status, headers=headers)

    # --- a stop: admit nothing new, answer what was admitted ------------------------------------
    def _admit(self) -> None:
        """Count a request as held until `_release`, or refuse it (503) while draining."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_drain())
        if self.draining:
            raise BadRequest(503, drain.DRAINING)
        self.held += 1

    def _release(self) -> None:
        self.held -= 1

    @contextlib.contextmanager
    def _admitted(self):
        self._admit()
        try:
            yield
        finally:
            self._release()

    async def _watch_drain(self) -> None:
        while True:
            try:
                if not self.draining:
                    self.draining = await asyncio.to_thread(drain.draining, self.app_name)
                if self.draining:
                    await asyncio.to_thread(drain.report_held, self.app_name, self.replica, self.held)
            except Exception:  # noqa: BLE001 - the store out of reach for a moment: look again
                pass
            await asyncio.sleep(drain.POLL_S)

    async def _is_draining(self) -> bool:
        """The flag itself, not the watch's last look: health routes answer a probe at once."""
        if not self.draining:
            try:
                self.draining = await asyncio.to_thread(drain.draining, self.app_name)
            except Exception:  # noqa: BLE001 - no answer from the store is no reason to stop
                pass
        return self.draining

    # --- routes ---------------------------------------------------------------------------------
    async def predict(self, request: Request):
        try:
            t0 = time.perf_counter()
            with self._admitted(), contextlib.ExitStack() as held:
                with self._on_its_way():  # read and decode as one span, as the fused batch waits on it
                    [(_, data)] = await read_files(request, False, self.o.max_body_bytes, self.o.body_timeout_s)
                    t1 = time.perf_counter()
                    pixels = held.enter_context(self._holding([data]))  # its pixels, until it is answered
                    img = await self._image(data, pixels)
                t2 = time.perf_counter()
                out = await self._answer(img)
            # where a request's server-side time goes, for the benchmarks' breakdown of the gap
            self.timing["read"] += t1 - t0
            self.timing["decode"] += t2 - t1
            self.timing["answer"] += time.perf_counter() - t2
            self.timed += 1
            return JSONResponse(out, headers={GEAR_HEADER: str(out["gear"])}) if "gear" in out else out
        except BadRequest as e:
            return self._error(e)

    async def Predict(self, data: bytes, grpc_context):  # noqa: N802 - the gRPC method's name (grpc_api)
        """``/tinysaver.Cascade/Predict`` through Serve's gRPC proxy: the image's bytes → the JSON
        answer of /predict; a refusal sets the call's status code and details instead."""
        try:
            check_token(dict(grpc_context.invocation_metadata()), REPLICA_TOKEN[0])
            check_size(len(data), self.o.max_body_bytes)
            with self._admitted(), self._holding([data]) as pixels:
                with self._on_its_way():
                    img = await self._image(bytes(data), pixels)
                return grpc_api.reply(await self._answer(img))
        except BadRequest as e:
            grpc_context.set_code(getattr(grpc.StatusCode, grpc_api.STATUS.get(e.status, "UNKNOWN")))
            grpc_context.set_details(e.reason)
            return grpc_api.Reply(b"")

    async def predict_batch(self, request: Request):
        try:
            self._admit()  # held until the stream's last line (or the client leaves)
        except BadRequest as e:
            return self._error(e)
        try:
            files = await read_files(request, True, self.o.max_body_bytes, self.o.body_timeout_s)
            self._check_count(len(files))
            held = self._reserve([d for _, d in files])
        except BadRequest as e:
            self._release()
            return self._error(e)

        async def stream():
            try:
                async for chunk in lines():
                    yield chunk
            finally:
                self.pixels.give(held)
                self._release()

        async def lines():
            # counted from the stream's start until every image is decoded and handed on, with no
            # await between (a client that leaves before then lets them go in the finally)
            self.incoming += len(files)
            try:
                imgs = await asyncio.to_thread(decode_all, [d for _, d in files], self.budget)
            finally:
                self.incoming -= len(files)
            loop, t0 = asyncio.get_running_loop(), time.perf_counter()

            def line(k: int, outcome) -> dict:
                head = {"index": k, "file": files[k][0]}
                if isinstance(outcome, BadRequest):
                    return {**head, "error": outcome.reason, "status": outcome.status}
                if isinstance(outcome, TimeoutError):
                    return {**head, "error": OVERLOADED, "status": 503}
                if isinstance(outcome, BaseException):  # a stage failed on this image's batch
                    return {**head, "error": f"the cascade failed: {type(outcome).__name__}: {outcome}"[:300],
                            "status": 500}
                return {**head, **self._record(imgs[k], t0, *self.answerer.unpack(outcome))}

            answers = []
            for img in imgs:
                if isinstance(img, BadRequest):  # its refusal as its answer, ready now
                    answers.append(loop.create_future())
                    answers[-1].set_result(img)
                else:
                    answers.append(self.answerer.submit(img, t0))
            async for chunk in ndjson_as_ready(answers, line, self.answerer.stream_timeout_s):
                yield chunk

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    def _status(self) -> str:
        """``ok`` without an audit; else the audit's state: certified, uncertain or drift."""
        return "ok" if self.audit.state == "off" else self.audit.state

    def _thresholds(self) -> list:
        """The thresholds in use: the spec's, or where --adapt has moved them."""
        live = self.answerer.thresholds
        return [t if math.isfinite(t) else None for t in live]  # JSON has no inf

    async def _starting_now(self) -> list[str]:
        try:
            return await asyncio.to_thread(self.answerer.starting)
        except Exception as e:  # no answer from Serve's controller is no proof of health
            return [f"unknown ({type(e).__name__}: {str(e)[:200]})"]

    async def healthz(self):
        """Readiness with the audit: 503 while the stages start or the service drains."""
        starting = await self._starting_now()
        audit = self.audit.view()
        if audit["loss_points"]:
            self.m_bound.set(audit["loss_points"]["upper"])
        status = "draining" if await self._is_draining() else "starting" if starting else self._status()
        body = {"status": status, "layout": self.spec.layout, "stages": self.names,
                "thresholds": self._thresholds(), "answered": self.requests, "audit": audit}
        if self.answerer.gearing is not None:
            body["gears"] = self._gears()
        if starting:
            body["waiting_for"] = starting
        if status in ("draining", "starting"):
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(drain.RETRY_AFTER_S)})
        return body

    # --- the Open Inference Protocol (KServe v2): the cascade as one model ----------------------
    async def _answer_all(self, imgs: list) -> list[dict]:
        """/predict's answer for each decoded image, through the same batching and audit; one
        BadRequest for the request when any image cannot be answered (the protocol has no per-item
        errors): 503 to retry, 500 when a stage failed."""
        t0 = time.perf_counter()
        try:
            outs = await self.answerer.answer_all(imgs, t0)
            return [self._record(img, t0, *o) for img, o in zip(imgs, outs)]
        except BadRequest:
            raise
        except Exception as e:  # a stage failed on a batch that held one of these images
            raise BadRequest(500, f"the cascade failed: {type(e).__name__}: {e}"[:300]) from None

    def _check_model(self, name: str, version: str) -> None:
        """The protocol's 404 for a model or version this service does not serve."""
        if name != self.oip_name:
            raise BadRequest(404, f"unknown model {name!r}; this service serves {self.oip_name!r}")
        if version != oip.VERSION:
            raise BadRequest(404, f"unknown version {version!r}; the cascade has version {oip.VERSION}")

    def _unknown(self, name: str, version: str) -> JSONResponse | None:
        """`_check_model`'s refusal as an answer; None for the model this service serves."""
        try:
            self._check_model(name, version)
        except BadRequest as e:
            return self._error(e)
        return None

    async def _infer(self, req: oip.InferRequest) -> list[dict]:
        """An admitted infer request's answers (HTTP or gRPC), its images decoded under the pool."""
        with self._holding(req.images):
            with self._on_its_way():
                imgs = await asyncio.to_thread(decode_all, req.images, self.budget)
            bad = next(((i, x) for i, x in enumerate(imgs) if isinstance(x, BadRequest)), None)
            if bad:
                raise BadRequest(bad[1].status, f"image {bad[0]}: {bad[1].reason}")
            return await self._answer_all(imgs)

    async def oip_server(self):
        return {"name": "tinysaver", "version": __version__, "extensions": oip.EXTENSIONS}

    async def oip_live(self):
        return {"live": True}

    async def oip_ready(self):
        r = await self.readyz()
        return r if isinstance(r, JSONResponse) else {"ready": True}

    async def oip_metadata(self, name: str, version: str = oip.VERSION):
        return self._unknown(name, version) or oip.model_metadata(self.oip_name, self.o.gears)

    async def oip_model_ready(self, name: str, version: str = oip.VERSION):
        unknown = self._unknown(name, version)
        if unknown:
            return unknown
        r = await self.readyz()
        return r if isinstance(r, JSONResponse) else {"name": self.oip_name, "ready": True}

    async def oip_config(self, name: str, version: str = oip.VERSION):
        stages = self.spec.stages
        return self._unknown(name, version) or oip.model_config(
            self.oip_name, stages.names, stages.thresholds, self.o.max_images, self.o.max_batch_size,
            self.o.batch_wait_timeout_s * 1e3, self.o.gears)

    async def oip_stats(self, name: str | None = None, version: str = oip.VERSION):
        """Triton's statistics from the counts the replica keeps (one replica's, as /metrics is)."""
        unknown = self._unknown(name, version) if name is not None else None
        if unknown:
            return unknown
        sums = self.answerer.timing_sums()
        batches = await self.answerer.batch_sizes()
        first = batches.get(f"fused:{self.names[0]}") or batches.get(self.names[0]) or {}  # the first stage's
        return oip.model_stats(self.oip_name, self.requests, sum(first.values()), int(self.last_answer_s * 1e3),
                               {"success": self.latency_ms, "queue": 1e3 * sums.get("queue", 0.0),
                                "compute_infer": 1e3 * sums.get("engine", 0.0)})

    async def oip_repository(self):
        return oip.repository_index(self.oip_name, await self._ready())

    async def oip_infer(self, name: str, request: Request, version: str = oip.VERSION):
        unknown = self._unknown(name, version)
        if unknown:
            return unknown
        try:
            with self._admitted():
                with self._on_its_way():
                    req = oip.parse_infer(await read_body(request, self.o.max_body_bytes, self.o.body_timeout_s),
                                          request.headers.get(oip.HEADER_LENGTH), self.o.max_images, self.o.gears)
                answers = await self._infer(req)
        except BadRequest as e:
            return self._error(e)
        body, headers = oip.encode_response(self.oip_name, req, answers)
        return Response(body, headers={k: v for k, v in headers.items() if k != "content-type"},
                        media_type=headers["content-type"])

    # --- the same protocol over gRPC (tinysaver.serve.oip_grpc): Serve's proxy calls these by name --
    @staticmethod
    def _refuse(grpc_context, e: BadRequest, method: str):
        grpc_context.set_code(getattr(grpc.StatusCode, grpc_api.STATUS.get(e.status, "UNKNOWN")))
        grpc_context.set_details(e.reason)
        return oip_grpc.empty(method)

    async def _ready(self) -> bool:
        return not isinstance(await self.readyz(), JSONResponse)  # readyz refuses while starting or draining

    async def ModelInfer(self, data: bytes, grpc_context):  # noqa: N802 - the protocol's method names
        try:
            check_token(dict(grpc_context.invocation_metadata()), REPLICA_TOKEN[0])
            check_size(len(data), self.o.max_body_bytes)
            request = oip_grpc.request("ModelInfer", data)
            self._check_model(request.model_name, request.model_version or oip.VERSION)
            with self._admitted():
                req = oip_grpc.parse_infer(request, self.o.max_images, self.o.gears)
                answers = await self._infer(req)
            return oip_grpc.infer_response(self.oip_name, req, answers)
        except BadRequest as e:
            return self._refuse(grpc_context, e, "ModelInfer")

    async def ServerLive(self, data: bytes, grpc_context):  # noqa: N802
        return oip_grpc.messages().ServerLiveResponse(live=True)

    async def ServerReady(self, data: bytes, grpc_context):  # noqa: N802
        return oip_grpc.messages().ServerReadyResponse(ready=await self._ready())

    async def _model_call(self, method: str, data: bytes, grpc_context, answer):
        """A model's readiness or metadata: NOT_FOUND for a model this service does not serve."""
        try:
            request = oip_grpc.request(method, data)
            self._check_model(request.name, request.version or oip.VERSION)
        except BadRequest as e:
            return self._refuse(grpc_context, e, method)
        return await answer()

    async def ModelReady(self, data: bytes, grpc_context):  # noqa: N802
        async def ready():
            return oip_grpc.messages().ModelReadyResponse(ready=await self._ready())
        return await self._model_call("ModelReady", data, grpc_context, ready)

    async def ServerMetadata(self, data: bytes, grpc_context):  # noqa: N802
        return oip_grpc.server_metadata(__version__)

    async def ModelMetadata(self, data: bytes, grpc_context):  # noqa: N802
        async def metadata():
            return oip_grpc.model_metadata(self.oip_name, self.o.gears)
        return await self._model_call("ModelMetadata", data, grpc_context, metadata)

    async def RepositoryModelLoad(self, data: bytes, grpc_context):  # noqa: N802
        return self._refuse(grpc_context, BadRequest(501, "this service serves one cascade, loaded when it "
                                                          "starts: there is no model to load"), "RepositoryModelLoad")

    async def RepositoryModelUnload(self, data: bytes, grpc_context):  # noqa: N802
        return self._refuse(grpc_context, BadRequest(501, "this service serves one cascade, loaded when it "
                                                          "starts: stop the service to unload it"),
                            "RepositoryModelUnload")

    async def livez(self):
        """Liveness: this replica's event loop answers (a stopping service is still alive)."""
        return {"status": "live"}

    async def readyz(self):
        """Readiness: 200 when every stage is up and the service admits requests; a load balancer
        stops sending on the 503 that a drain gives at once."""
        if await self._is_draining():
            return self._error(BadRequest(503, "draining: " + drain.DRAINING))
        starting = await self._starting_now()
        if starting:
            return self._error(BadRequest(503, f"starting: waiting for {', '.join(starting)}"))
        return {"status": "ready"}

    def _timing(self) -> dict:
        """Mean milliseconds per answered /predict request: reading the body, decoding, and the
        answer; in the fused layout the answer splits into the wait for a batch and the engine."""
        per = lambda total, n: round(1e3 * total / n, 3) if n else None  # noqa: E731
        out = {k: per(self.timing[k], self.timed) for k in ("read", "decode", "answer")}
        return {**out, **self.answerer.timing(), "requests": self.timed}

    async def metrics(self, request: Request):
        """Prometheus text (``Accept: application/json`` gives ``/metrics.json``'s body)."""
        stats = await self._stats()
        if "application/json" in request.headers.get("accept", ""):
            return stats
        return Response(prom.render(stats), media_type=prom.CONTENT_TYPE)

    async def metrics_json(self):
        return await self._stats()

    async def _stats(self) -> dict:
        """Counters, batch sizes, timing and the audit: the body of /metrics.json."""
        batches = await self.answerer.batch_sizes()
        n = max(self.requests, 1)
        return {"requests": self.requests, "stages": self.names, "layout": self.spec.layout,
                "thresholds": self._thresholds(),
                "exits": {self.names[i]: self.exits[i] for i in range(len(self.names))},
                "exit_ratio": {self.names[i]: round(self.exits[i] / n, 4) for i in range(len(self.names))},
                "batch_sizes": batches,
                "latency_ms_histogram": {str(k): v for k, v in sorted(self.latency.items(), key=lambda kv: (
                    kv[0] == "inf", kv[0] if kv[0] != "inf" else 0))},
                "timing_ms": self._timing(),
                "retried_calls": self.answerer.retried, "unavailable": self.answerer.unavailable,
                "incoming": self.incoming,
                "status": self._status(), "audit": self.audit.view(), "gears": self._gears(), "pid": os.getpid()}

    def _gears(self) -> dict | None:
        """With --gears: the gear in use, each gear's answers and threshold, and each gear's audit."""
        gearing = self.answerer.gearing
        if gearing is None:
            return None
        return {**gearing.view(), "audit": {str(g): m.view() for g, m in sorted(self.gear_audits.items())}}


# the ingress's token, set when its replica starts: `_authorized` is called by FastAPI without the
# ingress instance, so the token lives beside it in this module (one ingress per replica process)
REPLICA_TOKEN: list = [None]


async def _authorized(request: Request) -> None:
    """The token, as one dependency of every route that asks for it (`routes.Route.token`)."""
    try:
        check_token(request.headers, REPLICA_TOKEN[0])
    except BadRequest as e:
        raise HTTPException(e.status, e.reason) from None


_OPENAPI = {"predict": _ONE_IMAGE, "predict_batch": _IMAGES, "oip_infer": _OIP_INFER}  # bodies FastAPI cannot infer
for _r in ROUTES:
    api.add_api_route(_r.path, getattr(IngressServer, _r.handler), methods=[_r.method],
                      openapi_extra=_OPENAPI.get(_r.handler),
                      dependencies=[Depends(_authorized)] if _r.token else None)
# what each route may answer besides 200, as the service answers it (``{"error": reason}``): the
# schema FastAPI writes lists 422 for routes with parameters, which this service never sends (it
# answers a malformed request 400), and none of the refusals below
_REFUSALS = {400: "a malformed request, or an image that cannot be used", 401: "the token is missing or wrong",
             404: "an unknown model or version", 408: "the body did not arrive whole in time",
             413: "the body, an image, or the number of images is over its limit",
             415: "a content type or Content-Encoding the route does not take",
             503: "overloaded, starting or draining: retry after Retry-After seconds"}
_ERROR_BODY = {"application/json": {"schema": {"type": "object", "required": ["error"],
                                               "properties": {"error": {"type": "string"}}}}}


def _refusals(route) -> list[int]:
    codes = {503} | ({400, 408, 413, 415} if route.method == "POST" else set())
    return sorted(codes | ({401} if route.token else set()) | ({404} if "{name}" in route.path else set()))


def _openapi() -> dict:
    """FastAPI's schema, with each route's refusals as the service gives them and without 422."""
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=__version__, routes=api.routes)
        for r in ROUTES:
            op = schema["paths"][r.path][r.method.lower()]
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for code in _refusals(r):
                responses[str(code)] = {"description": _REFUSALS[code], "content": _ERROR_BODY}
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _openapi
# the class keeps a module-level name of its own, so that Serve ships it by reference: shipped by
# value, its methods would write a copy of this module's REPLICA_TOKEN
Ingress = serve.deployment(name="Ingress", graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)(
    serve.ingress(api)(IngressServer))


__all__ = ["Ingress", "IngressServer", "StageServer", "api"]
