"""The service over gRPC, through Serve's gRPC proxy (``tinysaver serve --grpc-port``).

Measured on this 2-core VM, a bare Serve app answers 2.4× as many requests per second over gRPC as
over HTTP at concurrency 32 (RESULTS, "The fused service with its own batcher, over HTTP and
gRPC"): Serve's HTTP proxy and the ASGI app in the replica cost more CPU per request than the gRPC
path does.

One unary method, ``/tinysaver.Cascade/Predict``. No ``.proto`` is needed: the request message is
the encoded image itself (PNG, JPEG…) and the reply is the JSON answer of ``POST /predict``, as
UTF-8 bytes, so any gRPC client with identity serializers can call it (``predict`` below is one).
Metadata: ``authorization: Bearer <token>`` where the service has a token, and ``application``
where Serve runs several applications. A refusal has the HTTP route's reason as its details and
the status code of ``STATUS``. Nothing here imports Ray.
"""
from __future__ import annotations

import json

from . import oip_grpc

SERVICE = "tinysaver.Cascade"
METHOD = f"/{SERVICE}/Predict"
SERVICER = "tinysaver.serve.grpc_api.add_servicer"  # for Serve's gRPCOptions.grpc_servicer_functions
# the HTTP status of a refusal → its gRPC status code (grpc.StatusCode member names)
STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED",
          413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT", 500: "INTERNAL", 501: "UNIMPLEMENTED",
          503: "UNAVAILABLE"}


def servicers() -> list[str]:
    """What Serve's gRPC proxy registers: this module's ``Predict``, and the Open Inference
    Protocol's service where its generated module is installed (`tinysaver.serve.oip_grpc`)."""
    return [SERVICER] + ([oip_grpc.SERVICER] if oip_grpc.available() else [])


def listing() -> str:
    """The gRPC methods as the start-up line says them."""
    if oip_grpc.available():
        return f"{METHOD} and the Open Inference Protocol's {oip_grpc.SERVICE}"
    return f"{METHOD}; the Open Inference Protocol over gRPC needs pip install 'tinysaver[grpc]'"


def add_servicer(servicer, server) -> None:
    """Register ``Predict`` (Serve's gRPC proxy calls this, then routes each call to the
    replica's method of that name). No deserializer: the replica gets the request's bytes."""
    import grpc

    handler = grpc.method_handlers_generic_handler(SERVICE, {"Predict": grpc.unary_unary_rpc_method_handler(
        servicer.Predict)})
    server.add_generic_rpc_handlers((handler,))


class Reply(bytes):
    """A reply Serve can send: its replica calls ``SerializeToString`` on what a method returns."""

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf name Serve calls
        return bytes(self)


def reply(answer: dict) -> Reply:
    return Reply(json.dumps(answer).encode())


def predict(target: str, image: bytes, token: str | None = None, application: str | None = None,
            timeout_s: float = 30.0) -> dict:
    """One image's answer from the service's gRPC port at ``target`` ("host:port"), as ``/predict``
    gives it. A refusal raises ``grpc.RpcError`` (``.code()``, ``.details()``)."""
    import grpc

    metadata = [("authorization", f"Bearer {token}")] if token else []
    if application:
        metadata.append(("application", application))
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)
        return json.loads(call(image, metadata=metadata, timeout=timeout_s))


__all__ = ["METHOD", "SERVICE", "SERVICER", "STATUS", "Reply", "add_servicer", "listing", "predict", "reply", "servicers"]
