"""Serve a saver with ESN exits inside its base on Ray Serve, in either of tinysaver's layouts.

The parts of the network, in running order, are the engine's stages (`esn.exits.exit_stages`):

- part 0, the saver. Its answer is exit 0, and it hands the ESN's first token on;
- part n (1 … N), base stage n (with the stem for n = 1) followed by ESN exit n. It hands its
  feature map and the bus tokens on;
- part N + 1, the rest of the base and its head, which answers whatever is left.

``build_esn_app`` makes a `tinysaver.serve.ServiceSpec` whose factory is `part_stages`, and
tinysaver's own service runs it: ``fused`` (every part in each replica, on the shared engine) or
``per-stage`` (one deployment per part, a request going on only while no exit fires). The routes,
audit, retries and metrics are tinysaver's; an audit runs the base's parts from the first one.

Thresholds come from an `esn.policy.ExitPolicy`. `esn.policy.calibrated_policy` picks
them on the zoo's calibration split, or the user gives them. Parts run eager PyTorch, because they
are cut out of the eager model.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from tinysaver.backends import DEFAULT_BACKEND, backends_that, get_backend
from tinysaver.errors import UsageError
from tinysaver.serve import application
from tinysaver.serve.options import ServiceSpec, ServeOptions
from tinysaver.stageplan import StagePlan, stage_values
from tinysaver.zoo import load_zoo

from .pair import Pair
from .policy import ExitPolicy
from .staged import staged
from .train import load_esn

PART_STAGES = "esn.serve:part_stages"


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def part_names(saver: str, base: str, num_exits: int) -> list[str]:
    """Stage names in answers and metrics: the saver, ``<base>/exit<n>``, the base."""
    return [saver, *(f"{base}/exit{n}" for n in range(1, num_exits + 1)), base]


def part_stages(spec: ServiceSpec, device: str = "cpu", only: list[int] | None = None) -> dict:
    """The factory of an ESN spec: {part index: engine stage} on this replica's ``device`` (the
    saver, each exit, the base's head; a replica keeps those of ``only``)."""
    from .exits import exit_stages

    checkpoint, sha256 = spec.extra["checkpoint"], spec.extra.get("sha256")
    if sha256 is not None and file_sha256(checkpoint) != sha256:
        # a replica Serve restarts must not mix a retrained ESN with the parts still running
        raise RuntimeError(f"{checkpoint} changed after the service was built; restart the service")
    esn, ck = load_esn(checkpoint)
    zoo = load_zoo(spec.stages.zoo_dir)
    s, b = (zoo.load_model(k, device=device, accept_preprocess_change=spec.stages.accept_preprocess_change)
            for k in (ck.saver, ck.base))
    for m in (s, b):
        m.module.eval().requires_grad_(False)
    pair = Pair(ck.zoo, ck.saver, ck.base, s, b, staged(b.module, ck.granularity))
    parts = exit_stages(pair, esn.to(device).eval(), list(spec.stages.temperatures), device)
    return {i: parts[i] for i in (range(len(parts)) if only is None else only)}


def check_policy(policy: ExitPolicy, num_exits: int) -> None:
    """One threshold for the saver and each exit, and temperatures for those and the base head when
    given (their values are checked by the spec, `tinysaver.stageplan.StagePlan`)."""
    want = num_exits + 1
    if len(policy.thresholds) != want:
        raise UsageError(f"the saver and {num_exits} ESN exits need {want} thresholds, got {len(policy.thresholds)}")
    if policy.temperatures is not None and len(policy.temperatures) != want + 1:
        raise UsageError(f"give {want + 1} temperatures > 0 (saver, exits, base head), got {policy.temperatures}")


def esn_spec(checkpoint: str | Path, zoo, policy: ExitPolicy, options: ServeOptions | None = None) -> ServiceSpec:
    """The service spec of the saver, the ESN exits of ``checkpoint`` and their base, checked before
    anything is deployed: the checkpoint, its models in ``zoo``, the thresholds and the options."""
    checkpoint = Path(checkpoint).resolve()  # replicas may run in another working directory
    esn, ck = load_esn(checkpoint)
    if ck.zoo != zoo.name:
        raise UsageError(f"{checkpoint} was trained on zoo {ck.zoo!r}'s models; serve it with --zoo {ck.zoo}")
    for key in (ck.saver, ck.base):
        zoo.model(key)
    check_policy(policy, esn.num_exits)
    o = options or ServeOptions()
    names = part_names(ck.saver, ck.base, esn.num_exits)
    n = len(names)
    backends = stage_values(o.backend or DEFAULT_BACKEND, n, "backend", (str,))  # ESN parts: eager by default
    if not all(get_backend(b).torch_modules for b in backends):
        raise UsageError(f"ESN exits run on {'/'.join(backends_that(torch_modules=True))} (each part is cut out of "
                         "the torch module); drop --backend")
    class_names = zoo.class_names
    stages = StagePlan(str(zoo.path), (ck.saver,) + (ck.base,) * (n - 1), tuple(names),
                       tuple(float(t) for t in policy.thresholds),
                       tuple(float(t) for t in (policy.temperatures or [1.0] * n)), backends, (None,) * n, (False,) * n,
                       batch_size=o.max_batch_size, class_names=tuple(class_names) if class_names else None,
                       preprocess=zoo.preprocesses((ck.saver, ck.base)),
                       accept_preprocess_change=o.accept_preprocess_change, base_from=1)
    return ServiceSpec(stages, o, factory=PART_STAGES,
                extra={"checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint)})


def build_esn_app(checkpoint: str | Path, zoo, policy: ExitPolicy, options: ServeOptions | None = None,
                  token: str | None = None):
    """A Ray Serve application for the saver, the ESN exits of ``checkpoint`` and their base
    (``policy``: one threshold per running-order exit, as `esn.policy.calibrated_policy` gives)."""
    return application(esn_spec(checkpoint, zoo, policy, options), token)


__all__ = ["build_esn_app", "check_policy", "esn_spec", "part_names", "part_stages"]
