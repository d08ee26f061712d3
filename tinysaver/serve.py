"""Serve a cascade on Ray Serve: one deployment per stage, dynamic batching, early answers, a live loss bound.

``build_app(selection, zoo)`` returns a Serve application (``serve.run(app)``):

- one **stage deployment** per model of the selection (savers, then the base). Each batches the
  requests it gets with ``@serve.batch`` and derives its own input from the decoded uint8 image
  with its own timm preprocessing, exactly as :class:`tinysaver.cascade.Cascade` does;
- one **ingress** (FastAPI through ``@serve.ingress``) that decodes each image once, asks the
  stages in order, and answers as soon as an exit fires (:func:`tinysaver.policy.exits`). A
  request answered by a saver never waits for the base.

Routes: ``POST /predict`` (one image, raw bytes or multipart), ``POST /predict/batch`` (multipart,
answers streamed as JSON lines in the order they are ready), ``GET /healthz`` (503 with status
``starting`` until Serve reports every stage healthy) and ``GET /metrics`` (JSON; the same
counters also go to Ray's Prometheus metrics through ``ray.serve.metrics``).

**Audit.** A fraction (``audit``) of the early answers is also sent to the base after the answer
has gone out. Over the last ``audit_window`` requests, with E early exits of which m were audited
and k disagreed with the base, the accuracy the cascade gives up against the base is at most
(E / W) · CP⁺(k, m, δ), a label-free Clopper–Pearson upper bound on the live traffic (it bounds
the disagreement, which is at least the loss). Once the window is full, a bound above
``audit_tolerance`` (accuracy points) logs a warning and shows ``drift`` in ``/healthz`` and
``/metrics``: the traffic no longer looks like the calibration data. Size the window so that it
holds enough audits (W · audit · exit ratio of a few dozen); few audits make a wide bound.

**Faults.** A request that finds a stage replica dead is retried while Serve restarts it; after
``retries`` failures, or once ``request_timeout_s`` has passed, it gets HTTP 503 with "retry" in its
reason, never a hang. Bad bodies get 400
(not an image, empty), 413 (over ``max_body_bytes``) or 415 (content type), and touch nothing else.
Replicas drain their accepted requests on shutdown (``graceful_shutdown_timeout_s``).
"""
# No ``from __future__ import annotations`` here: FastAPI reads the route signatures at
# definition time, and ``Request`` is imported inside the function that builds the app.
import asyncio
import logging
import math
import os
import random
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .policy import Selection, exits

log = logging.getLogger("tinysaver.serve")

GRACEFUL_SHUTDOWN_S = 30.0  # how long a replica Serve stops may finish what it accepted
RAW_TYPES = ("application/octet-stream", "image/")
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class ServeOptions:
    """How to serve. Per-stage values take one number for every stage or one per stage."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    replicas: int | Sequence[int] = 1
    num_cpus: float | Sequence[float] | None = None  # None: 1.5 CPUs shared by the stages, at most 0.5 each
    num_gpus: float | Sequence[float] = 0.0
    ingress_num_cpus: float = 0.25
    max_ongoing_requests: int = 256   # per ingress replica; more wait in Serve's proxy
    backend: str | Sequence[str] = "eager"
    audit: float = 0.0                # fraction of early answers also sent to the base
    delta: float = 0.1
    audit_tolerance: float = 1.0      # accuracy points
    audit_window: int = 200           # requests the bound is computed over; the alarm waits until it is full
    max_body_bytes: int = 10 * 2**20
    retries: int = 5
    # below the replicas' graceful shutdown (30 s): a request waiting on a stage that is being deleted
    # gets a 503 before Serve kills the ingress under it (which the client would see as a 500)
    request_timeout_s: float = 25.0
    seed: int = 0
    accept_preprocess_change: bool = False

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError("max_batch_size must be ≥ 1 and batch_wait_timeout_s ≥ 0")
        if not 0 <= self.audit <= 1:
            raise ValueError(f"--audit is a fraction of the early answers in [0, 1], got {self.audit}")
        if not 0 < self.delta < 1:
            raise ValueError(f"δ must be in (0, 1), got {self.delta}")
        if self.audit_tolerance <= 0 or self.audit_window < 1:
            raise ValueError("the audit tolerance and window must be positive")
        if self.max_body_bytes < 1 or self.retries < 0:
            raise ValueError("max_body_bytes must be ≥ 1 and retries ≥ 0")
        if not 0 < self.request_timeout_s < GRACEFUL_SHUTDOWN_S:
            raise ValueError(f"request_timeout_s must be in (0, {GRACEFUL_SHUTDOWN_S}) s, the replicas' graceful "
                             f"shutdown, got {self.request_timeout_s}")

    def per_stage(self, name: str, n: int) -> list:
        v = getattr(self, name)
        if name == "num_cpus" and v is None:
            # Serve's default of 1 CPU per replica never schedules a saver, a base and an ingress
            # on 2 cores; an ESN adds a deployment per exit. Shares this small fit any machine.
            v = min(0.5, 1.5 / n)
        out = [v] * n if isinstance(v, (int, float, str)) else list(v)
        if len(out) != n:
            raise ValueError(f"{name}: give one value for all {n} stages or one per stage, got {v}")
        return out


# Serve's controller gives a starting HTTP proxy 5 s to report ready and 10 s per health check,
# then kills it. On a busy 2-core machine a proxy can need longer just to import FastAPI (seen in CI
# with a training job beside the tests; 62 s with a matmul loop beside them), so a local instance
# gives it more.
PROXY_START_S = 300
PROXY_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": str(PROXY_START_S), "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def local_ray_env() -> None:
    """Settings for a Ray instance this process starts to serve from (call before ``ray.init``):
    replicas at the default priority (:mod:`tinysaver.ray_local`) and a patient proxy start-up.
    Values the user set in the environment are kept."""
    from .ray_local import set_local_ray_env

    set_local_ray_env(PROXY_ENV)


def start_serve(http_options: dict, wait_s: float = PROXY_START_S) -> None:
    """``serve.start(http_options=...)``, waiting up to ``wait_s`` seconds for the HTTP proxies.

    ``serve.start`` waits a fixed 60 s for its proxies and then raises, although the controller it
    started goes on and the proxy comes up later. On a starved machine we therefore connect to that
    controller and wait for Serve to report every proxy healthy. Raises TimeoutError past ``wait_s``.
    """
    from ray import serve

    t0 = time.monotonic()
    try:
        serve.start(http_options=http_options)
        return
    except TimeoutError as e:
        if "proxies not available" not in str(e):
            raise
        log.warning("Serve's HTTP proxy is slow to start (%s); waiting up to %.0f s in all", e, wait_s)
    serve.start(http_options=http_options)  # the controller is running now: this connects to it
    while True:
        proxies = serve.status().proxies
        if proxies and all(st == "HEALTHY" for st in proxies.values()):  # ProxyStatus is a str enum
            return
        if time.monotonic() - t0 > wait_s:
            raise TimeoutError(f"Serve's HTTP proxies were not healthy after {wait_s:.0f} s: {proxies}")
        time.sleep(1.0)


def loss_bound(records: Sequence[tuple[bool, bool | None]], delta: float) -> float | None:
    """Upper bound (fraction) on the accuracy the cascade gives up against the base over ``records``:
    one (exited early, disagreed with the base, or None when not audited) per request.

    (E / W) · CP⁺(k, m, δ) with W requests, E early exits, m of them audited and k disagreeing.
    Few audits give a wide bound; with none it is E / W, as if every early answer were wrong.
    """
    from .risk import clopper_pearson

    w = len(records)
    if w == 0:
        return None
    exited = [d for e, d in records if e]
    audited = [d for d in exited if d is not None]
    if not exited:
        return 0.0
    if not audited:
        return len(exited) / w
    k = int(sum(audited))
    return len(exited) / w * float(clopper_pearson(np.array([k]), len(audited), delta, upper=True)[0])


def stage_device(num_gpus: float) -> str:
    """Where a stage replica runs its model: on the GPU Ray gave it (``num_gpus`` > 0), else the CPU."""
    if num_gpus <= 0:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("this stage was given --num-gpus > 0, but its replica sees no CUDA device")
    return "cuda"


class StageRunner:
    """One saver or base stage outside Ray: its model on its backend and device, answering a batch.

    Items are (decoded uint8 image (C, H, W), carry); a saver or base needs only the image, so the
    answers are (class, confidence, None), with confidence = max softmax(logits / temperature).
    """

    def __init__(self, model, backend: str = "eager", temperature: float = 1.0, device: str = "cpu"):
        from .runtimes import make_runner

        self.model, self.temperature, self.device = model, float(temperature), device
        self.runner = make_runner(model, backend)

    def __call__(self, items: list) -> list[tuple[int, float, None]]:
        import torch

        from .transforms import prepare_batch

        with torch.inference_mode():
            x = prepare_batch([img for img, _ in items], self.model.preprocess).to(self.device)
            logits = self.runner(x).float().cpu()
        conf, pred = (logits / self.temperature).softmax(-1).max(-1)
        return [(p, c, None) for p, c in zip(pred.tolist(), conf.tolist())]


def _stage_deployment():
    from ray import serve
    from ray.serve import metrics

    @serve.deployment(graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)
    class StageServer:
        """One cascade stage (a :class:`StageRunner`), with dynamic batching."""

        def __init__(self, zoo_dir: str, key: str, backend: str, max_batch_size: int, wait_s: float,
                     accept_preprocess_change: bool, temperature: float = 1.0, num_gpus: float = 0.0):
            from .zoo import load_zoo

            device = stage_device(num_gpus)
            model = load_zoo(zoo_dir).load_model(key, device=device, accept_preprocess_change=accept_preprocess_change)
            self.run = StageRunner(model, backend, temperature, device)
            self.classify.set_max_batch_size(max_batch_size)
            self.classify.set_batch_wait_timeout_s(wait_s)
            self.sizes: Counter = Counter()
            self.hist = metrics.Histogram("tinysaver_stage_batch_size", description="requests per stage batch",
                                          boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("stage",))
            self.hist.set_default_tags({"stage": key})

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def classify(self, items: list) -> list[tuple[int, float, None]]:
            """(image, carry) → (class, confidence, carry for the next stage)."""
            out = self.run(items)
            self.sizes[len(items)] += 1
            self.hist.observe(len(items))
            return out

        def stats(self) -> dict:
            return {"batch_sizes": {int(k): v for k, v in sorted(self.sizes.items())}, "pid": os.getpid(),
                    "device": self.run.device}

    return StageServer


class BadRequest(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class AuditState:
    window: deque = field(default_factory=deque)
    audited: int = 0
    dropped: int = 0  # audits given up at the deadline (an overloaded base); not in the bound
    disagreements: int = 0
    alarm: bool = False
    bound: float | None = None


def _ingress_deployment():
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve
    from ray.serve import metrics

    app = FastAPI(title="tinysaver cascade")
    from ray.serve.exceptions import RayServeException

    # a dead replica, or a deployment Serve is replacing or deleting (no replica, back-pressure, a
    # cancelled call): a retry may find a new replica, else the client is told to retry. Seen under
    # load while the app was deleted, where these had come back as HTTP 500.
    dead = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, RayServeException)

    @serve.deployment(graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)
    @serve.ingress(app)
    class CascadeIngress:
        """Asks the stages in order. Stage ``i`` takes (image, carry of stage i − 1) and returns
        (class, confidence, carry); the base's answer comes from running stages ``base_from`` … last
        (only the last for a saver cascade; every base segment for ESN exits)."""

        def __init__(self, stages: list, names: list[str], thresholds: list[float], class_names, opts: dict,
                     base_from: int | None = None):
            self.stages, self.names, self.thresholds = stages, names, thresholds
            self.base_from = len(stages) - 1 if base_from is None else base_from
            self.class_names = class_names
            self.o = ServeOptions(**opts)
            self.rng = random.Random(self.o.seed)
            self.requests = 0
            self.exits = Counter()
            self.retried = 0
            self.unavailable = 0
            self.latency = Counter()
            self.audit = AuditState(window=deque(maxlen=self.o.audit_window))
            self._starting, self._status_at = list(names), -math.inf
            self.m_requests = metrics.Counter("tinysaver_requests", description="answered images")
            self.m_exits = metrics.Counter("tinysaver_exits", description="answers per stage", tag_keys=("stage",))
            self.m_latency = metrics.Histogram("tinysaver_latency_ms", description="server-side latency",
                                               boundaries=list(LATENCY_BUCKETS_MS))
            self.m_bound = metrics.Gauge("tinysaver_audit_loss_bound", description="upper bound on accuracy given up")

        # --- input -------------------------------------------------------------------------------
        async def _body(self, request: Request) -> bytes:
            n = request.headers.get("content-length")
            if n is not None and n.isdigit() and int(n) > self.o.max_body_bytes:
                raise BadRequest(413, f"body of {n} bytes exceeds the limit of {self.o.max_body_bytes}")
            chunks, total = [], 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > self.o.max_body_bytes:
                    raise BadRequest(413, f"body exceeds the limit of {self.o.max_body_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        async def _files(self, request: Request, many: bool) -> list[tuple[str, bytes]]:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            body = await self._body(request)
            if ctype.startswith("multipart/form-data"):
                request._body = body  # starlette parses the multipart form from the cached body
                form = await request.form()
                files = [(getattr(v, "filename", k) or k, await v.read()) for k, v in form.multi_items()
                         if hasattr(v, "read")]
                if not files:
                    raise BadRequest(400, "the multipart body holds no file")
                return files if many else files[:1]
            if many:
                raise BadRequest(415, f"/predict/batch takes multipart/form-data, got {ctype or 'no content type'}")
            if not ctype.startswith(RAW_TYPES):
                raise BadRequest(415, f"send an image as application/octet-stream, image/* or multipart/form-data, "
                                      f"got {ctype or 'no content type'}")
            return [("body", body)]

        @staticmethod
        def _decode(data: bytes):
            from .data import decode_image

            if not data:
                raise BadRequest(400, "empty body: send the image's bytes")
            try:
                return decode_image(data)
            except Exception as e:  # the decoder's own words name the problem
                raise BadRequest(400, f"not a decodable image ({type(e).__name__}: {str(e).splitlines()[0][:200]})")

        # --- the cascade ---------------------------------------------------------------------------
        async def _stage(self, i: int, img, carry, deadline: float) -> tuple[int, float, object]:
            """Stage i's answer, retried while Serve replaces a dead replica, until ``deadline``
            (time.monotonic()). A stage being deleted can leave a call waiting for a replica that
            never comes; the deadline answers it with a 503 before Serve kills this replica."""
            for attempt in range(self.o.retries + 1):
                response = self.stages[i].classify.remote((img, carry))
                call = asyncio.ensure_future(response)
                # not asyncio.wait_for: on timeout it also waits for the cancelled call to finish
                # cancelling, which on a starved machine kept a request waiting a minute past its
                # deadline while its call was still being routed
                try:
                    done, _ = await asyncio.wait({call}, timeout=max(deadline - time.monotonic(), 0.0))
                finally:
                    if not call.done():  # past the deadline, or the client left: so does the stage call
                        response.cancel()
                        call.cancel()
                if not done:
                    break
                try:
                    return call.result()
                except dead:  # the replica died; Serve is starting another
                    self.retried += 1
                    await asyncio.sleep(min(0.2 * 2 ** attempt, 3.0, max(deadline - time.monotonic(), 0.0)))
            self.unavailable += 1
            raise BadRequest(503, f"stage {self.names[i]} is restarting or overloaded; retry the request")

        async def _answer(self, img) -> dict:
            t0 = time.perf_counter()
            last = len(self.stages) - 1
            carry, deadline = None, time.monotonic() + self.o.request_timeout_s
            for i in range(len(self.stages)):
                pred, conf, carry = await self._stage(i, img, carry, deadline)
                if i == last or exits(np.array([conf], dtype=np.float32), self.thresholds[i])[0]:
                    break
            ms = (time.perf_counter() - t0) * 1e3
            early = i < last
            record = [early, None]
            self.audit.window.append(record)
            if early and self.o.audit > 0 and self.rng.random() < self.o.audit:
                asyncio.get_running_loop().create_task(self._audit(img, pred, record, i, carry))
            self.requests += 1
            self.exits[i] += 1
            self.latency[next((b for b in LATENCY_BUCKETS_MS if ms <= b), "inf")] += 1
            self.m_requests.inc()
            self.m_exits.inc(tags={"stage": self.names[i]})
            self.m_latency.observe(ms)
            return {"class": int(pred), "name": self.class_names[int(pred)] if self.class_names else None,
                    "confidence": float(conf), "exit_stage": i, "stage_name": self.names[i],
                    "latency_ms": round(ms, 3)}

        async def _audit(self, img, pred: int, record: list, answered: int, carry) -> None:
            # runs after the early answer has gone out: the client never waits for it. The base's
            # own chain goes on from the answering stage (other savers are skipped).
            try:
                deadline = time.monotonic() + self.o.request_timeout_s
                for j in range(max(answered + 1, self.base_from), len(self.stages)):
                    base_pred, _, carry = await self._stage(j, img, carry, deadline)
            except BadRequest:
                self.audit.dropped += 1
                return
            record[1] = base_pred != pred
            self.audit.audited += 1
            self.audit.disagreements += int(record[1])
            self._update_alarm()

        def _update_alarm(self) -> None:
            a = self.audit
            full = len(a.window) == a.window.maxlen  # no alarm from the first few requests
            a.bound = loss_bound([tuple(r) for r in a.window], self.o.delta)
            if a.bound is not None:
                self.m_bound.set(a.bound)
            alarm = bool(full and a.bound is not None and 100 * a.bound > self.o.audit_tolerance)
            if alarm and not a.alarm:
                log.warning("tinysaver: the audit bounds the accuracy given up at %.2f points (δ=%g), above the "
                            "tolerance of %.2f: the traffic has drifted from the calibration data",
                            100 * a.bound, self.o.delta, self.o.audit_tolerance)
            a.alarm = alarm

        def _audit_view(self) -> dict:
            a = self.audit
            return {"fraction": self.o.audit, "audited": a.audited, "dropped": a.dropped,
                    "disagreements": a.disagreements,
                    "window_requests": len(a.window), "loss_bound_points": None if a.bound is None else
                    round(100 * a.bound, 4), "tolerance_points": self.o.audit_tolerance, "delta": self.o.delta,
                    "alarm": a.alarm}

        @staticmethod
        def _error(e: BadRequest) -> JSONResponse:
            return JSONResponse({"error": e.reason}, status_code=e.status)

        # --- routes ---------------------------------------------------------------------------------
        @app.post("/predict")
        async def predict(self, request: Request):
            try:
                [(_, data)] = await self._files(request, many=False)
                img = await asyncio.to_thread(self._decode, data)
                return await self._answer(img)
            except BadRequest as e:
                return self._error(e)

        @app.post("/predict/batch")
        async def predict_batch(self, request: Request):
            try:
                files = await self._files(request, many=True)
            except BadRequest as e:
                return self._error(e)

            async def one(index: int, name: str, data: bytes) -> dict:
                try:
                    img = await asyncio.to_thread(self._decode, data)
                    return {"index": index, "file": name, **(await self._answer(img))}
                except BadRequest as e:
                    return {"index": index, "file": name, "error": e.reason, "status": e.status}

            async def lines():
                import json

                for ready in asyncio.as_completed([one(i, n, d) for i, (n, d) in enumerate(files)]):
                    yield json.dumps(await ready) + "\n"

            return StreamingResponse(lines(), media_type="application/x-ndjson")

        def _stages_starting(self) -> list[str]:
            """Stages whose deployment Serve does not report HEALTHY yet (the ingress is up, and
            so answers, before its stages have loaded their models)."""
            now = time.monotonic()
            if now - self._status_at > 1.0:  # one controller call per second at most
                app = serve.get_replica_context().app_name
                deployments = serve.status().applications[app].deployments
                self._starting = [n for h, n in zip(self.stages, self.names)
                                  if deployments[h.deployment_name].status != "HEALTHY"]
                self._status_at = now
            return self._starting

        @app.get("/healthz")
        async def healthz(self):
            try:
                starting = await asyncio.to_thread(self._stages_starting)
            except Exception as e:  # no answer from Serve's controller is no proof of health
                starting = [f"unknown ({type(e).__name__}: {str(e)[:200]})"]
            body = {"status": "starting" if starting else "drift" if self.audit.alarm else "ok",
                    "stages": self.names, "audit": self._audit_view()}
            if starting:
                return JSONResponse({**body, "waiting_for": starting}, status_code=503)
            return body

        @app.get("/metrics")
        async def metrics_json(self):
            batches = {}
            for name, h in zip(self.names, self.stages):
                try:
                    batches[name] = (await h.stats.remote())["batch_sizes"]
                except dead:
                    batches[name] = None
            n = max(self.requests, 1)
            return {"requests": self.requests, "stages": self.names,  # JSON has no inf: a disabled exit is null
                    "thresholds": [t if np.isfinite(t) else None for t in self.thresholds],
                    "exits": {self.names[i]: self.exits[i] for i in range(len(self.names))},
                    "exit_ratio": {self.names[i]: round(self.exits[i] / n, 4) for i in range(len(self.names))},
                    "batch_sizes": batches,
                    "latency_ms_histogram": {str(k): v for k, v in sorted(self.latency.items(), key=lambda kv: (
                        kv[0] == "inf", kv[0] if kv[0] != "inf" else 0))},
                    "retried_calls": self.retried, "unavailable": self.unavailable,
                    "status": "drift" if self.audit.alarm else "ok", "audit": self._audit_view()}

    return CascadeIngress


def stage_options(o: ServeOptions, names: Sequence[str]) -> list[dict]:
    """Serve options of each stage deployment, in running order (replicas, CPUs, GPUs per stage).

    Serve's default of 5 ongoing requests per replica would cap every batch at 5 and, once all
    replicas are full, send the router into back-off: under 32 concurrent clients that cut the
    throughput from 60 to 8 images/s. A stage takes enough to fill two batches.
    """
    n = len(names)
    replicas, cpus, gpus = o.per_stage("replicas", n), o.per_stage("num_cpus", n), o.per_stage("num_gpus", n)
    return [{"name": f"stage{i}-{name.replace('/', '_')}", "num_replicas": int(r),
             "max_ongoing_requests": 2 * o.max_batch_size,
             "ray_actor_options": {"num_cpus": float(c), "num_gpus": float(g)}}
            for i, (name, r, c, g) in enumerate(zip(names, replicas, cpus, gpus))]


def ingress_app(stages: list, names: Sequence[str], thresholds: Sequence[float], class_names,
                o: ServeOptions, base_from: int | None = None):
    """The application: the ingress bound to stage deployments that follow the (image, carry) →
    (class, confidence, carry) protocol of this module. ``thresholds`` has one entry per stage but
    the last; ``base_from`` is where the base's own chain starts (default: the last stage)."""
    if len(thresholds) != len(stages) - 1 or len(names) != len(stages):
        raise ValueError(f"{len(stages)} stages need {len(stages) - 1} thresholds and {len(stages)} names")
    # the ingress only awaits, so it takes many requests at once
    return _ingress_deployment().options(max_ongoing_requests=o.max_ongoing_requests,
                                         ray_actor_options={"num_cpus": o.ingress_num_cpus}).bind(
        stages, list(names), [float(t) for t in thresholds], class_names, asdict(o), base_from)


def build_app(selection: Selection | dict | str | Path, zoo=None, options: ServeOptions | None = None,
              root: Path | None = None):
    """A Ray Serve application for ``selection`` (a Selection, its dict or a JSON file) over ``zoo``.

    Validates the selection and looks every model up before anything is deployed. Stage replicas
    load their model from the zoo's folder, which must be readable where they run.
    """
    from .cascade import zoo_class_names
    from .runtimes import check_backend
    from .zoo import load_zoo

    selection = Selection.coerce(selection, "build_app")
    o = options or ServeOptions()
    zoo = zoo or load_zoo(selection.zoo, root)
    for m in selection.models:
        zoo.model(m)
    backends = o.per_stage("backend", len(selection.models))
    for b, g in zip(backends, o.per_stage("num_gpus", len(backends))):
        check_backend(b)
        if g > 0 and b != "eager":
            raise ValueError(f"the {b} backend runs on CPU here: give its stage --num-gpus 0, or run it on eager")
    Stage = _stage_deployment()
    stages = [Stage.options(**opt).bind(str(zoo.path), key, b, o.max_batch_size, o.batch_wait_timeout_s,
                                        o.accept_preprocess_change, t, opt["ray_actor_options"]["num_gpus"])
              for key, b, t, opt in zip(selection.models, backends, selection.temperatures,
                                        stage_options(o, selection.models))]
    return ingress_app(stages, selection.models, selection.thresholds, zoo_class_names(zoo), o)


__all__ = ["ServeOptions", "StageRunner", "build_app", "ingress_app", "stage_device", "stage_options", "loss_bound"]
