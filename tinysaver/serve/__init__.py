"""The cascade as a Ray Serve service, and the pieces it is made of.

``build_app(selection, zoo, options)`` returns a Serve application (``serve.run(app)``); the builder
``app`` makes the same from ``serve run tinysaver.serve:app zoo=fashion-mnist base=resnet10t``.
One job per file: ``options`` (``ServeOptions`` and the frozen ``ServiceSpec``), ``http`` (bodies,
multipart, decoding, the pixel cap, tokens), ``audit`` (the live loss bound), ``fused`` and
``per_stage`` (one module per layout: how a request finds its answer), ``stages`` (what a replica
loads), ``routes`` (the HTTP
surface, declared once), ``deployments`` (the Serve deployments, which import Ray), ``builders``
(plans and applications), ``oip`` (the Open Inference Protocol's requests and responses), ``prom``
(``/metrics`` as Prometheus text), ``drain`` (the stop flag the replicas read), ``listener``
(closing the proxy's listener before a stop), ``lifecycle`` (a local Ray of the service's own:
its start, Serve's start, drain and stop) and ``default`` (the default cascade as an application, for
``serve build``). ``deployments``, ``drain`` and ``lifecycle`` import Ray, and only when used.
"""
from .audit import AuditMonitor, confidence_sequence
from .builders import app, application, build_app, service_spec, replica_needs, stage_options, unschedulable
from .http import BadRequest
from .lifecycle import local_ray_env, start_serve
from .options import GRACEFUL_SHUTDOWN_S, LAYOUTS, ServiceSpec, ServeOptions
from .per_stage import ItemStage
from .stages import stage_device

__all__ = ["AuditMonitor", "BadRequest", "GRACEFUL_SHUTDOWN_S", "ItemStage", "LAYOUTS", "ServiceSpec", "ServeOptions",
           "app", "application", "build_app", "confidence_sequence", "local_ray_env", "service_spec",
           "replica_needs", "stage_device", "stage_options", "start_serve", "unschedulable"]
