"""Settings for a Ray instance that tinysaver starts on this machine (not for a cluster it joins).

Ray starts its workers at nice 15, below every other process on the machine. The workers are the
work here (profiling units, serving replicas): beside one busy process at nice 0 on 2 cores, Serve's
stage replicas took 4 minutes to load a model that loads in 10 s on a quiet machine. So a local
instance runs them at the default priority.

Ray 2.60 turns on token authentication for every cluster started on the machine. ``ray.init``
writes a token to ``~/.ray/auth_token`` when none exists, but ``ray start --head`` and
``ray.cluster_utils.Cluster`` do not, and fail on a machine where no token was ever written:
`ensure_ray_token` writes it first, the way Ray's own CLI does.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKER_ENV = {"RAY_worker_niceness": "0"}
# Ray's command line, run by this interpreter (the ``ray`` script may not be on PATH in a venv)
RAY_CLI = "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"


def set_local_ray_env(extra: dict[str, str] | None = None) -> None:
    """Put `WORKER_ENV` and ``extra`` into the environment, for a Ray instance this process
    is about to start (call before ``ray.init``). Values the user already set are kept."""
    for k, v in {**WORKER_ENV, **(extra or {})}.items():
        os.environ.setdefault(k, v)


def ensure_ray_token() -> None:
    """Have Ray write its token (``ray get-auth-token --generate``) unless the user gave one
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``), turned authentication off
    (``RAY_AUTH_MODE=disabled``), or ``~/.ray/auth_token`` exists. A Ray without token
    authentication has no such command; then nothing is needed and nothing is done."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN") \
            or os.environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").exists():
        return
    # the token goes to stdout: captured, never shown
    subprocess.run([sys.executable, "-c", RAY_CLI, "get-auth-token", "--generate"], capture_output=True, timeout=120)


__all__ = ["WORKER_ENV", "RAY_CLI", "set_local_ray_env", "ensure_ray_token"]
