"""How a stopping service tells its ingress replicas to drain, and learns when they have.

The command that runs the service sets one flag in the cluster's key-value store (the GCS, which
every replica reaches wherever it runs); each ingress replica looks at it a few times a second,
refuses new requests with 503 and ``Retry-After`` from then on, and writes how many requests it
still holds. Serve's own stop would remove the routes first, so that the requests of the last
seconds got the proxy's plain-text 404, which clients and load balancers take as permanent.
"""
from __future__ import annotations

from ray.experimental import internal_kv

from .http import RETRY_AFTER_S

NAMESPACE = "tinysaver"
POLL_S = 0.2  # how often a replica looks at the flag (a drain waits at least this long)
DRAINING = "the service is stopping; retry the request (another replica or the restarted service answers it)"


def _flag(app: str) -> bytes:
    return f"drain:{app}".encode()


def _held(app: str) -> bytes:
    return f"held:{app}:".encode()


def start_drain(app: str) -> None:
    """Ask every ingress replica of ``app`` to refuse new requests from now on."""
    internal_kv._internal_kv_put(_flag(app), b"1", namespace=NAMESPACE)


def draining(app: str) -> bool:
    return internal_kv._internal_kv_exists(_flag(app), namespace=NAMESPACE)


def report_held(app: str, replica: str, n: int) -> None:
    """A draining replica says how many admitted requests it has not answered yet."""
    internal_kv._internal_kv_put(_held(app) + replica.encode(), str(int(n)).encode(), namespace=NAMESPACE)


def held(app: str) -> int:
    """Requests the draining replicas of ``app`` still hold, summed over those that reported."""
    total = 0
    for key in internal_kv._internal_kv_list(_held(app), namespace=NAMESPACE):
        value = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
        total += int(value) if value else 0
    return total


def clear(app: str) -> None:
    """Forget an earlier drain of ``app`` (a service restarted on a cluster that outlived it)."""
    internal_kv._internal_kv_del(_flag(app), namespace=NAMESPACE)
    internal_kv._internal_kv_del(_held(app), del_by_prefix=True, namespace=NAMESPACE)


__all__ = ["NAMESPACE", "POLL_S", "DRAINING", "RETRY_AFTER_S", "start_drain", "draining", "report_held",
           "held", "clear"]
