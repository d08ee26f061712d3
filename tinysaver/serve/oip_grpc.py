"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on Serve's gRPC proxy.

The service is the one KServe's v2 protocol and Triton's clients call (``tritonclient.grpc``,
KServe's ``InferenceGRPCClient``). Its generated module comes from the ``kserve`` wheel
(``pip install 'tinysaver[grpc]'``): Serve's proxy registers it through `add_servicer`, then
routes each call to the ingress method of the same name, which gets the request message and
returns the response message. The messages say what the HTTP routes say (`tinysaver.serve.oip`):
the cascade is one model, its input ``image`` a BYTES tensor of encoded images, in
``contents.bytes_contents`` or in ``raw_input_contents`` (each element a 4-byte little-endian
length and its bytes); the outputs come back in ``raw_output_contents``, as Triton's server sends
them. A refusal is the HTTP route's reason with the status code of `tinysaver.serve.grpc_api.STATUS`.

Only this module imports the generated messages, and only when called: kserve's module and
``tritonclient.grpc`` both register ``inference.*`` in protobuf's default pool, so one process may
hold one of them, and the service's replicas hold kserve's. Nothing here imports Ray.
"""
from __future__ import annotations

import importlib
import importlib.util

from . import oip
from .http import BadRequest

SERVICE = "inference.GRPCInferenceService"
SERVICER = "tinysaver.serve.oip_grpc.add_servicer"  # for Serve's gRPCOptions.grpc_servicer_functions
_MODULE = "kserve.protocol.grpc.grpc_predict_v2_pb2"


def available() -> bool:
    """Whether the generated service can be loaded here (the ``grpc`` extra)."""
    try:
        return importlib.util.find_spec(_MODULE) is not None
    except ModuleNotFoundError:  # kserve itself absent
        return False


def messages():
    """kserve's generated messages module (``ModelInferRequest``, …)."""
    return importlib.import_module(_MODULE)


def add_servicer(servicer, server) -> None:
    """Register every method of the v2 service (Serve's proxy then routes each to the replica).

    Without a request deserializer: the replica gets the request's bytes and parses them itself
    (`request`). Serve's proxy pickles what it hands a replica, and kserve's generated classes
    cannot be pickled (they name a module, ``grpc_predict_v2_pb2``, that does not exist)."""
    import grpc

    methods = messages().DESCRIPTOR.services_by_name[SERVICE.split(".")[-1]].methods
    handler = grpc.method_handlers_generic_handler(SERVICE, {m.name: grpc.unary_unary_rpc_method_handler(
        getattr(servicer, m.name)) for m in methods})
    server.add_generic_rpc_handlers((handler,))


def request(method: str, data: bytes):
    """The request message of ``method`` (``ModelInfer``, …) parsed from the bytes the proxy passed;
    a 400 where they are not one."""
    from google.protobuf.message import DecodeError

    try:
        return getattr(messages(), f"{method}Request").FromString(bytes(data))
    except DecodeError as e:
        raise BadRequest(400, f"the {method} request is not a protobuf message of the protocol: {e}") from None


def _parameter(params, key: str):
    """An ``InferParameter``'s value (bool, int or str), or None where ``key`` is absent."""
    if key not in params:
        return None
    p = params[key]
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def parse_infer(msg, max_images: int | None = None, gears: bool = False) -> oip.InferRequest:
    """A ``ModelInferRequest`` → what it asks, checked as the HTTP route checks its JSON (400, 413)."""
    if len(msg.inputs) != 1:
        raise BadRequest(400, f"this model takes one input, '{oip.INPUT}'; the request has {len(msg.inputs)}")
    tensor = msg.inputs[0]
    want = oip.check_input(tensor.name, tensor.datatype, tensor.shape, max_images)
    if msg.raw_input_contents:
        if len(msg.raw_input_contents) != 1:
            raise BadRequest(400, f"raw_input_contents has {len(msg.raw_input_contents)} entries for the one input")
        images = oip.split_bytes(msg.raw_input_contents[0])
    elif tensor.HasField("contents"):
        images = list(tensor.contents.bytes_contents)
    else:
        raise BadRequest(400, f"input '{oip.INPUT}' has neither contents nor raw_input_contents")
    oip.check_count(tensor.shape, want, images)
    outputs = []
    for o in msg.outputs:
        k = _parameter(o.parameters, "classification")
        if k is not None and (isinstance(k, str) or k < 0):
            raise BadRequest(400, f"output {o.name!r}: the parameter 'classification' is a count, got {k!r}")
        outputs.append(oip.requested(o.name, int(k or 0), gears=gears))
    if not outputs:
        outputs = [oip.Requested(n) for n in oip.outputs(gears)]
    return oip.InferRequest(images, outputs, msg.id or None)


def infer_response(name: str, req: oip.InferRequest, answers) -> object:
    """The ``ModelInferResponse`` for ``answers`` (one ``/predict`` answer dict per image)."""
    pb = messages()
    out = pb.ModelInferResponse(model_name=name, model_version=oip.VERSION, id=req.id or "")
    for r, datatype, shape, values in oip.tensors(req, answers):
        out.outputs.add(name=r.name, datatype=datatype, shape=shape)
        out.raw_output_contents.append(oip.binary(datatype, values))
    return out


def model_metadata(name: str, gears: bool = False) -> object:
    meta = oip.model_metadata(name, gears)
    pb = messages()
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta["name"], versions=meta["versions"], platform=meta["platform"],
        inputs=[tensor(**t) for t in meta["inputs"]], outputs=[tensor(**t) for t in meta["outputs"]])


def server_metadata(version: str) -> object:
    return messages().ServerMetadataResponse(name="tinysaver", version=version, extensions=oip.EXTENSIONS)


def empty(method: str) -> object:
    """The response message of ``method`` with nothing set: what a refused call returns beside its status."""
    return getattr(messages(), f"{method}Response")()


__all__ = ["SERVICE", "SERVICER", "add_servicer", "available", "empty", "infer_response", "messages",
           "model_metadata", "parse_infer", "request", "server_metadata"]
