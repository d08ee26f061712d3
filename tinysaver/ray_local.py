"""Settings for a Ray instance that tinysaver starts on this machine (not for a cluster it joins).

Ray starts its workers at nice 15, below every other process on the machine. The workers are the
work here (profiling units, serving replicas): beside one busy process at nice 0 on 2 cores, Serve's
stage replicas took 4 minutes to load a model that loads in 10 s on a quiet machine. So a local
instance runs them at the default priority.
"""
from __future__ import annotations

import os

WORKER_ENV = {"RAY_worker_niceness": "0"}


def set_local_ray_env(extra: dict[str, str] | None = None) -> None:
    """Put :data:`WORKER_ENV` and ``extra`` into the environment, for a Ray instance this process
    is about to start (call before ``ray.init``). Values the user already set are kept."""
    for k, v in {**WORKER_ENV, **(extra or {})}.items():
        os.environ.setdefault(k, v)
