"""What a service is: its options (``ServeOptions``) and the one frozen ``ServiceSpec`` every deployment is
bound to. Plain dataclasses: nothing here imports Ray."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..engine import per_stage
from ..errors import ServeError
from ..limits import MAX_PIXELS
from ..risk import check_delta
from ..stageplan import StagePlan

GRACEFUL_SHUTDOWN_S = 30.0  # how long a replica Serve stops may finish what it accepted
LAYOUTS = ("fused", "per-stage")
# what loads a spec's stages in a replica: "module:function(spec, device, only) -> engine stages"
MODEL_STAGES = "tinysaver.serve.stages:model_stages"


@dataclass(frozen=True)
class ServeOptions:
    """How to serve. Per-stage values take one number for every stage or one per stage.

    ``layout``: ``fused`` runs every stage in each replica of one deployment (one hop from Serve's
    proxy); ``per-stage`` gives each stage a deployment of its own, for stages that need their own
    hardware or replica count. None picks ``per-stage`` when any resource is given per stage
    (a list for ``replicas``, ``num_cpus``, ``num_gpus`` or ``resources``), else ``fused``.
    """

    layout: str | None = None
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    replicas: int | Sequence[int] = 1
    # per-stage: None gives 1.5 CPUs shared by the stages, at most 0.5 each; fused: 1 CPU per replica
    num_cpus: float | Sequence[float] | None = None
    num_gpus: float | Sequence[float] = 0.0
    # custom Ray resources each replica needs (to pin a stage to a node): one dict, or one per stage
    resources: dict | Sequence[dict] | None = None
    ingress_num_cpus: float = 0.25
    max_ongoing_requests: int = 256   # per ingress replica; more wait in Serve's proxy
    max_queued_requests: int = 64     # waiting in the proxy for an ingress replica; more get 503 at once
    # a body not whole within this many seconds gets 408, so slow or unfinished uploads free their slot
    body_timeout_s: float = 10.0
    # None: the layout's default (`tinysaver.serve.builders.layout_backend`); else one, or one per stage
    backend: str | Sequence[str] | None = None
    audit: float = 0.0                # fraction of early answers also sent to the base
    delta: float = 0.1
    audit_tolerance: float = 1.0      # accuracy points
    adapt: bool = False               # retune the saver's threshold within the bound (serve.adapt)
    max_body_bytes: int = 10 * 2**20
    # images per /predict/batch or OIP infer request: one request may not hold the replica for the others
    max_images: int = 256
    max_pixels: int | None = MAX_PIXELS  # width × height; larger images get 413 before decoding
    retries: int = 5
    # below the replicas' graceful shutdown (30 s): a request waiting on a stage that is being deleted
    # gets a 503 before Serve kills the ingress under it (which the client would see as a 500)
    request_timeout_s: float = 25.0
    seed: int = 0
    accept_preprocess_change: bool = False
    # switch between the selection's certified gears by load (tinysaver.gears), holding this p99 (ms)
    gears: bool = False
    latency_target_ms: float | None = None

    def __post_init__(self) -> None:
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ServeError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ServeError("--max-batch-size must be ≥ 1 and --batch-wait-ms ≥ 0")
        if not 0 <= self.audit <= 1:
            raise ServeError(f"--audit is a fraction of the early answers in [0, 1], got {self.audit}")
        check_delta(self.delta, ServeError)
        if self.adapt and not self.audit > 0:
            raise ServeError("--adapt retunes from audits: give --audit a fraction > 0 as well")
        if not 0 < self.audit_tolerance <= 100:
            raise ServeError(f"--audit-tolerance is in accuracy points, in (0, 100], got {self.audit_tolerance}")
        if self.max_body_bytes < 1 or self.retries < 0:
            raise ServeError(f"--max-body-mb must be > 0 (got {self.max_body_bytes} bytes) and retries ≥ 0")
        if not 0 < self.body_timeout_s < GRACEFUL_SHUTDOWN_S or self.max_queued_requests < 0:
            raise ServeError(f"body_timeout_s must be in (0, {GRACEFUL_SHUTDOWN_S}) s and max_queued_requests ≥ 0")
        if isinstance(self.max_images, bool) or not isinstance(self.max_images, int) or self.max_images < 1:
            raise ServeError(f"--max-images must be a whole number ≥ 1, got {self.max_images!r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ServeError(f"--max-pixels must be ≥ 1, got {self.max_pixels}")
        if self.gears != (self.latency_target_ms is not None):
            raise ServeError("--gears holds a latency target: give both --gears and --latency-target-ms MS")
        if self.gears and not 0 < self.latency_target_ms < 1e3 * self.request_timeout_s:
            raise ServeError(f"--latency-target-ms must be > 0 and below the request timeout "
                             f"({1e3 * self.request_timeout_s:g} ms), got {self.latency_target_ms}")
        if self.gears and self.adapt:
            raise ServeError("--adapt moves the threshold itself and --gears switches between certified ones: "
                             "give one of them")
        if not 0 < self.request_timeout_s < GRACEFUL_SHUTDOWN_S:
            raise ServeError(f"request_timeout_s must be in (0, {GRACEFUL_SHUTDOWN_S}) s, the replicas' graceful "
                             f"shutdown, got {self.request_timeout_s}")

    def per_stage(self, name: str, n: int) -> list:
        v = getattr(self, name)
        if name == "num_cpus" and v is None:
            # Serve's default of 1 CPU per replica never schedules a saver, a base and an ingress
            # on 2 cores; an ESN adds a deployment per exit. Shares this small fit any machine.
            v = min(0.5, 1.5 / n)
        if name == "resources" and v is None:
            v = {}
        return per_stage(v, n, f"--{name.replace('_', '-')}", scalar=(int, float, str, bool, dict, type(None)),
                         error=ServeError)

    def resolved_layout(self) -> str:
        if self.layout is not None:
            return self.layout
        given_per_stage = any(not isinstance(getattr(self, k), (int, float, dict, type(None)))
                              for k in ("replicas", "num_cpus", "num_gpus", "resources"))
        return "per-stage" if given_per_stage else "fused"


# what a layout answers a request: (stage, class, confidence, carry, first stage's (class, confidence)
# or None[, the gear that answered it])
Answer = tuple


@dataclass(frozen=True)
class ServiceSpec:
    """Everything a deployment needs, decided before anything is deployed; bound by keyword.

    ``stages``: the resolved `StagePlan` (models, thresholds,
    temperatures, backends, class names, where the base's chain starts); ``options``: how to serve
    them; ``factory``: the "module:function" that builds the stages in a replica (see
    `MODEL_STAGES`), with ``extra`` for it (an ESN checkpoint, say).
    """

    stages: StagePlan
    options: ServeOptions
    factory: str = MODEL_STAGES
    extra: dict = field(default_factory=dict)
    gears: dict | None = None  # the selection's gear plan (tinysaver.gears.GearPlan.to_dict) with --gears

    def __post_init__(self) -> None:
        n = len(self.stages)
        if self.options.adapt and (n != 2 or self.factory != MODEL_STAGES):
            raise ServeError(f"--adapt retunes one saver before its base; this policy has {n} stages"
                             f"{' (ESN exits)' if self.factory != MODEL_STAGES else ''}")
        if self.options.gears:
            if self.factory != MODEL_STAGES or n != 2:
                raise ServeError(f"--gears switches one saver's threshold before its base; this policy has {n} "
                                 f"stages{' (ESN exits)' if self.factory != MODEL_STAGES else ''}")
            if self.layout != "fused":
                raise ServeError("--gears switches in the fused layout, where a replica sees its whole queue; "
                                 "use --layout fused")
            if self.gears is None:
                raise ServeError("--gears needs a selection with a gear plan: tinysaver query --gears --max-loss "
                                 "POINTS --save sel.json, then --selection sel.json (or give --max-loss here)")

    @property
    def layout(self) -> str:
        return self.options.resolved_layout()


__all__ = ["Answer", "GRACEFUL_SHUTDOWN_S", "LAYOUTS", "MODEL_STAGES", "ServiceSpec", "ServeOptions"]
