"""The service's HTTP surface, declared once: every route, its handler on the ingress, whether it
asks for the token, and what it is for. The ingress registers its routes from this table
(`tinysaver.serve.deployments`), the command's start-up line and help list them from it, and the
stop reads its health route from it. Adding a route is a row here, its handler, and its test.
Nothing here imports Ray or FastAPI.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    """``method path`` answered by the ingress's ``handler``; ``token``: refused (401) without the
    service's bearer token when one is set; ``shown``: listed in the start-up line."""

    method: str
    path: str
    handler: str
    what: str
    token: bool = False
    shown: bool = True


HEALTH = "/healthz"  # what the command polls for the answered count and the audit
LIVE = "/livez"  # what the command asks Serve's proxy before it hands the port over
OIP = "/v2"  # the Open Inference Protocol's routes are listed once, as their prefix
ROUTES = (
    Route("POST", "/predict", "predict", "one image → its class, confidence and exit", token=True),
    Route("POST", "/predict/batch", "predict_batch", "images → one answer per line, each as soon as it is ready",
          token=True),
    Route("GET", HEALTH, "healthz", "readiness with the audit's state and bound"),
    Route("GET", LIVE, "livez", "liveness: the replica's event loop answers"),
    Route("GET", "/readyz", "readyz", "readiness: every stage up, and admitting requests"),
    Route("GET", "/metrics", "metrics", "Prometheus text (JSON with Accept: application/json)", token=True),
    Route("GET", "/metrics.json", "metrics_json", "the counters as JSON", token=True, shown=False),
    Route("GET", OIP, "oip_server", "the protocol's server metadata", shown=False),
    # before /v2/models/{name}, which would take "stats" for a model's name
    Route("GET", f"{OIP}/models/stats", "oip_stats", "Triton's statistics of every model (the one)", token=True,
          shown=False),
    Route("POST", f"{OIP}/repository/index", "oip_repository", "Triton's repository index", shown=False),
    Route("GET", f"{OIP}/health/live", "oip_live", "the protocol's liveness", shown=False),
    Route("GET", f"{OIP}/health/ready", "oip_ready", "the protocol's readiness", shown=False),
    Route("GET", f"{OIP}/models/{{name}}", "oip_metadata", "the cascade's model metadata", shown=False),
    Route("GET", f"{OIP}/models/{{name}}/versions/{{version}}", "oip_metadata", "the same, by version", shown=False),
    Route("GET", f"{OIP}/models/{{name}}/ready", "oip_model_ready", "the cascade's readiness", shown=False),
    Route("GET", f"{OIP}/models/{{name}}/config", "oip_config", "Triton's model configuration", shown=False),
    Route("GET", f"{OIP}/models/{{name}}/versions/{{version}}/config", "oip_config", "the same, by version",
          shown=False),
    Route("GET", f"{OIP}/models/{{name}}/stats", "oip_stats", "Triton's inference statistics", token=True,
          shown=False),
    Route("GET", f"{OIP}/models/{{name}}/versions/{{version}}/stats", "oip_stats", "the same, by version",
          token=True, shown=False),
    Route("GET", f"{OIP}/models/{{name}}/versions/{{version}}/ready", "oip_model_ready", "the same, by version",
          shown=False),
    Route("POST", f"{OIP}/models/{{name}}/infer", "oip_infer", "the protocol's infer: BYTES images → answers",
          token=True, shown=False),
    Route("POST", f"{OIP}/models/{{name}}/versions/{{version}}/infer", "oip_infer", "the same, by version",
          token=True, shown=False),
)


def listing() -> str:
    """The routes as the start-up line says them: ``POST /predict, POST /predict/batch, GET /healthz, …``."""
    out, last = [], None
    for r in (r for r in ROUTES if r.shown):
        out.append(r.path if r.method == last else f"{r.method} {r.path}")
        last = r.method
    return ", ".join(out) + f", and the Open Inference Protocol under {OIP}"


def with_token() -> list[str]:
    """The paths that need the token when one is set."""
    return sorted({r.path for r in ROUTES if r.token})


__all__ = ["HEALTH", "LIVE", "OIP", "ROUTES", "Route", "listing", "with_token"]
