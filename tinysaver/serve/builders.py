"""Applications: a spec for a selection, the deployments bound to it in either layout, and the
builder ``serve run tinysaver.serve:app key=value …`` calls."""
from __future__ import annotations

import collections.abc
import importlib.util
import json
import typing
from pathlib import Path
from typing import Annotated, Sequence

import pydantic
from pydantic import BeforeValidator

from ..backends import DEFAULT_BACKEND, backends_that, get_backend
from ..errors import ServeError, TinysaverError
from ..policy import Selection
from ..schemas import parse
from ..stageplan import StagePlan, resolve
from .http import token_or_env
from .options import ServiceSpec, ServeOptions


def service_spec(selection: Selection | dict | str | Path, zoo=None, options: ServeOptions | None = None,
                 root: Path | None = None) -> ServiceSpec:
    """The spec of a saver → … → base ``selection`` over ``zoo``, checked before anything is deployed:
    the stages resolved once (`tinysaver.stageplan.resolve`), and the options able to place them."""
    o = options or ServeOptions()
    selection = Selection.coerce(selection, "service_spec")  # a file is read once, for every use below
    stages = resolve(selection, zoo, backend=o.backend or DEFAULT_BACKEND,
                     accept_preprocess_change=o.accept_preprocess_change, batch_size=o.max_batch_size, root=root)
    if o.backend is None:  # the layout's default, from what the zoo records of each stage's model
        from ..zoo import load_zoo  # the manifest only: nothing is loaded or exported here

        zoo = zoo if zoo is not None else load_zoo(stages.zoo_dir)  # read once, for both calls below
        if (fast := layout_backend(stages, o, zoo)) != DEFAULT_BACKEND:
            stages = resolve(selection, zoo, backend=fast, accept_preprocess_change=o.accept_preprocess_change,
                             batch_size=o.max_batch_size, root=root)
    n = len(stages)
    for b, g in zip(stages.backends, o.per_stage("num_gpus", n)):
        if g > 0 and "cuda" not in get_backend(b).devices:
            raise ServeError(f"the {b} backend runs on CPU here: give its stage --num-gpus 0, or run it on "
                             f"{'/'.join(backends_that(devices=('cpu', 'cuda')))}")
    if o.resolved_layout() == "fused":
        for k in ("replicas", "num_cpus", "resources"):
            v = getattr(o, k)
            if v is not None and not isinstance(v, (int, float, dict)):
                raise ServeError(f"--layout fused runs every stage in one deployment: give --{k.replace('_', '-')} "
                                 "one value, or use --layout per-stage")
        if len(set(o.per_stage("num_gpus", n))) > 1:
            raise ServeError("--layout fused puts every stage on one device: give --num-gpus one value, or use "
                             "--layout per-stage")
    return ServiceSpec(stages, o, gears=selection.gears if o.gears else None)


def layout_backend(stages: StagePlan, o: ServeOptions, zoo) -> str:
    """The backend a service over ``zoo`` runs on when ``--backend`` is not given: in the fused layout
    on CPU, the first installed backend with light calls (`Backend.light_calls`: ONNX Runtime) for which the zoo
    records an exact export of every stage's model (the profiler's check against the stored eager
    predictions: top-1 on ≥ 99.9 % of samples, every confidence within 1e-4); else the default.
    A fused replica runs small batches under light load, where eager's per-call overhead dominates:
    measured on the Fashion pair, batch 1 cost 5.83 ms per image on eager and 1.04 on ONNX Runtime
    (benchmarks/bench_serve_layouts.py, docs/results/serving.md)."""
    if o.resolved_layout() != "fused" or any(g > 0 for g in o.per_stage("num_gpus", len(stages))):
        return DEFAULT_BACKEND
    for name in backends_that(light_calls=True):
        b = get_backend(name)
        if b.needs and importlib.util.find_spec(b.needs[0]) is None:
            continue
        if all(zoo.entry(k).backends.get(name, {}).get("exact") is True for k in set(stages.keys)):
            return name
    return DEFAULT_BACKEND


def stage_options(o: ServeOptions, names: Sequence[str]) -> list[dict]:
    """Serve options of each per-stage deployment, in running order (replicas, CPUs, GPUs per stage).

    Serve's default of 5 ongoing requests per replica would cap every batch at 5 and, once all
    replicas are full, send the router into back-off: under 32 concurrent clients that cut the
    throughput from 60 to 8 images/s. A stage takes enough to fill two batches.
    """
    n = len(names)
    replicas, cpus, gpus = o.per_stage("replicas", n), o.per_stage("num_cpus", n), o.per_stage("num_gpus", n)
    resources = o.per_stage("resources", n)
    return [{"name": f"stage{i}-{name.replace('/', '_')}", "num_replicas": int(r),
             "max_ongoing_requests": 2 * o.max_batch_size,
             "ray_actor_options": {"num_cpus": float(c), "num_gpus": float(g), **({"resources": dict(res)} if res else {})}}
            for i, (name, r, c, g, res) in enumerate(zip(names, replicas, cpus, gpus, resources))]


def replica_needs(spec: ServiceSpec) -> dict[str, dict[str, float]]:
    """What one replica of each deployment asks Ray for ({"CPU": …, "GPU": …, custom: …}), keyed by
    what a user calls it (``the base stage (resnet10t)``), so a replica that never starts can be
    explained by what no node has."""
    o = spec.options

    def need(cpus, gpus, res):
        return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {}), **{k: float(v) for k, v in (res or {}).items()}}

    if spec.layout == "fused":
        return {"the fused replica (every stage)": need(1.0 if o.num_cpus is None else o.num_cpus,
                                                        o.per_stage("num_gpus", 1)[0], o.resources)}
    last = len(spec.stages.names) - 1
    out = {f"the {'base' if i == last else 'saver' if i == 0 else f'stage {i}'} stage ({name})":
           need(opt["ray_actor_options"]["num_cpus"], opt["ray_actor_options"]["num_gpus"],
                opt["ray_actor_options"].get("resources"))
           for i, (name, opt) in enumerate(zip(spec.stages.names, stage_options(o, spec.stages.names)))}
    return {"the ingress": need(o.ingress_num_cpus, 0, None), **out}


def unschedulable(needs: dict[str, dict[str, float]], nodes: list[dict]) -> str | None:
    """The first deployment no alive node could ever hold, and why, in one sentence (None: all fit).
    ``nodes``: ``ray.nodes()``."""
    totals = [n.get("Resources", {}) for n in nodes if n.get("Alive", n.get("alive", False))]
    for name, need in needs.items():
        if any(all(t.get(k, 0.0) >= v for k, v in need.items()) for t in totals):
            continue
        short = [k for k, v in need.items() if not any(t.get(k, 0.0) >= v for t in totals)] or list(need)
        have = ", ".join(f"{k}={max((t.get(k, 0.0) for t in totals), default=0.0):g}" for k in short)
        return f"{name} needs {', '.join(f'{k}={need[k]:g}' for k in short)}; the largest node of this cluster has {have}"
    return None


def application(spec: ServiceSpec, token: str | None = None):
    """The Serve application of ``spec`` in its layout (see `tinysaver.serve.deployments`)."""
    from ray.serve.config import BackpressureConfig

    from .deployments import Ingress, StageServer

    o = spec.options
    # past the requests in progress, a few wait; more get 503 at once with Retry-After, never a silent queue
    admission = {"max_ongoing_requests": o.max_ongoing_requests, "max_queued_requests": o.max_queued_requests,
                 "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=1)}
    if spec.layout == "fused":
        cpus = 1.0 if o.num_cpus is None else float(o.num_cpus)
        actor = {"num_cpus": cpus, "num_gpus": float(o.per_stage("num_gpus", 1)[0])}
        if o.resources:
            actor["resources"] = dict(o.resources)
        return Ingress.options(num_replicas=int(o.replicas), ray_actor_options=actor,
                               **admission).bind(spec=spec, token=token)
    stages = [StageServer.options(**opt).bind(spec=spec, index=i)
              for i, opt in enumerate(stage_options(o, spec.stages.names))]
    # the ingress only awaits, so it takes many requests at once
    return Ingress.options(ray_actor_options={"num_cpus": o.ingress_num_cpus}, **admission).bind(
        spec=spec, stages=stages, token=token)


def build_app(selection: Selection | dict | str | Path, zoo=None, options: ServeOptions | None = None,
              root: Path | None = None, token: str | None = None):
    """A Ray Serve application for ``selection`` (a Selection, its dict or a JSON file) over ``zoo``.

    Validates the selection and looks every model up before anything is deployed. Replicas load
    their models from the zoo's folder, which must be readable where they run.
    """
    return application(service_spec(selection, zoo, options, root), token)


# --- serve run tinysaver.serve:app key=value ... ------------------------------------------------------

def _text_field(kind) -> tuple:
    """The pydantic type of a dataclass field as ``serve run`` gives it: text, read in lax mode
    ("2" → 2, "true" → True), with "a,b" → a list where the field takes one per stage and JSON
    where it takes a mapping."""
    args = typing.get_args(kind) or (kind,)
    takes_list = any(typing.get_origin(a) in (list, tuple, collections.abc.Sequence) for a in args)
    takes_dict = any(a is dict or typing.get_origin(a) is dict for a in args)

    def before(v):
        if not isinstance(v, str):
            return v
        if v.lower() == "none" and type(None) in args:
            return None
        if takes_dict:
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                return v  # the schema names it
        if takes_list and "," in v:
            return [x.strip() for x in v.split(",")]
        return v

    return Annotated[kind, BeforeValidator(before)], None


def _builder_schema() -> type[pydantic.BaseModel]:
    """``serve run tinysaver.serve:app``'s arguments, declared from the objects they configure (the
    policy request, the selector's config and the service's options), so there is one list of them."""
    from ..selector import PolicyRequest, SelectorConfig

    hints = {**typing.get_type_hints(SelectorConfig), **typing.get_type_hints(ServeOptions)}
    own = {"zoo": str, "root": str, "base": str, "selection": str, "token": str,
           "saver": str | list[str], "threshold": typing.get_type_hints(PolicyRequest)["threshold"]}
    spec = {name: _text_field(kind) for name, kind in {**hints, **own}.items()}
    return pydantic.create_model("ServeAppArgs", __config__=pydantic.ConfigDict(extra="forbid", frozen=True,
                                                                                allow_inf_nan=False), **spec)


def _typed(args: dict) -> dict:
    """``serve run``'s text arguments read through `_builder_schema`: typed values of the keys
    given, or one ServeError line naming the argument and the rule."""
    args = {str(k).replace("-", "_"): v for k, v in (args or {}).items()}
    parsed = parse(_builder_schema(), args, "tinysaver.serve:app", ServeError)
    return parsed.model_dump(exclude_unset=True)


def app(args: dict):
    """Application builder: ``serve run tinysaver.serve:app zoo=fashion-mnist base=resnet10t``.

    Keys: ``zoo`` (default fashion-mnist), ``root``, and either ``selection`` (a file from
    ``tinysaver query --save``) or ``base`` with the selector's options (``criterion``,
    ``tolerance``, …, ``saver``, ``threshold``); plus any `ServeOptions` field (``layout``,
    ``backend``, ``replicas``, ``audit``, …) and ``token``. Values are strings, as on the command line.
    Bad arguments raise a `TinysaverError`; under Ray's ``serve`` command
    they are its usage error, which it prints as one line, without a traceback.
    """
    try:
        return _app(args)
    except TinysaverError as e:
        import click

        if click.get_current_context(silent=True) is None:
            raise
        msg = str(e)
        raise click.UsageError(msg if msg.startswith("tinysaver.serve:app:") else f"tinysaver.serve:app: {msg}") \
            from None


def _app(args: dict):
    from ..selector import PolicyRequest, SelectorConfig, selection_for
    from ..zoo import DEFAULT_ZOO, load_zoo

    args = _typed(args)  # every argument is checked before the zoo loads
    zoo_name, root = args.pop("zoo", DEFAULT_ZOO), args.pop("root", None)
    sel_args = {k: args.pop(k) for k in list(args) if k in SelectorConfig.__dataclass_fields__}
    saver = args.pop("saver", None)
    request = PolicyRequest(args.pop("base", None), SelectorConfig(**sel_args),
                            [saver] if isinstance(saver, str) else saver, args.pop("threshold", None),
                            args.pop("selection", None))
    token = token_or_env(args.pop("token", None))
    options = ServeOptions(**args)
    zoo = load_zoo(zoo_name, root)
    return build_app(selection_for(zoo, request), zoo, options, token=token)


__all__ = ["app", "application", "build_app", "service_spec", "layout_backend", "replica_needs",
           "stage_options", "unschedulable"]
