"""The Open Inference Protocol (KServe v2) for the cascade: request parsing and response encoding.

The cascade is one model of the protocol, named after its base (``resnet10t-cascade``). Its input
``image`` is a ``BYTES`` tensor of N encoded images (PNG, JPEG, …): in JSON as base64 strings, as
KServe's image examples send them, or through the binary-data extension that ``tritonclient``
uses (a JSON header of ``Inference-Header-Content-Length`` bytes, then each element as a 4-byte
little-endian length and its bytes). Its outputs, one row per image: ``class_index`` (INT64),
``label`` (BYTES), ``confidence`` (FP32) and ``stage`` (BYTES, the stage that answered). An output
asked for with ``"parameters": {"classification": 1}`` comes back as ``"<score>:<index>:<label>"``
strings, as Triton's classification extension gives them; a cascade answers with its top-1 only,
so k > 1 is refused. Nothing here imports Ray: the parsing is tested on its own.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import TinysaverError
from ..schemas import OIPRequestSchema, load_json, parse
from .http import DIGITS, BadRequest

INPUT = "image"
OUTPUTS = {"class_index": "INT64", "label": "BYTES", "confidence": "FP32", "stage": "BYTES"}
GEAR = {"gear": "INT64"}  # a service with gears (--gears) also says which gear answered each image
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["classification", "binary_tensor_data"]
VERSION = "1"


def model_name(base: str) -> str:
    """The protocol's name of the cascade whose base is ``base``: ``<base>-cascade``."""
    return f"{base.replace('/', '_')}-cascade"


def outputs(gears: bool = False) -> dict[str, str]:
    """The outputs this model gives, name → datatype: ``gear`` too where the service has gears."""
    return {**OUTPUTS, **GEAR} if gears else OUTPUTS


def model_metadata(name: str, gears: bool = False) -> dict:
    return {"name": name, "versions": [VERSION], "platform": "tinysaver_cascade",
            "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": k, "datatype": v, "shape": [-1]} for k, v in outputs(gears).items()]}


@dataclass
class Requested:
    name: str
    binary: bool = False
    classification: int = 0


@dataclass
class InferRequest:
    """What an infer request asks: the encoded images, and the outputs in the order to give them."""

    images: list[bytes]
    outputs: list[Requested] = field(default_factory=list)
    id: str | None = None


def split_bytes(raw: bytes) -> list[bytes]:
    """The elements of a BYTES tensor in the binary form: each a 4-byte little-endian length, then its bytes."""
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise BadRequest(400, "the binary BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise BadRequest(400, f"a BYTES element says {n} bytes but only {len(raw) - at} follow")
        out.append(raw[at:at + n])
        at += n
    return out


def _from_json(data: Any) -> list[bytes]:
    flat = data if isinstance(data, list) else [data]
    while flat and all(isinstance(x, list) for x in flat):
        flat = [y for x in flat for y in x]
    out = []
    for i, x in enumerate(flat):
        if not isinstance(x, str):
            raise BadRequest(400, f"input '{INPUT}' element {i}: expected a base64 string, got {type(x).__name__}")
        try:
            out.append(_base64(x))
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"input '{INPUT}' element {i}: not base64: send the encoded image's bytes as "
                                  "standard base64 (RFC 4648, + and /, padded with =), URL-safe base64 (- and _), or "
                                  "a data URL (data:image/png;base64,…); or as binary data") from None
    return out


def _base64(text: str) -> bytes:
    """Standard or URL-safe base64, bare or in a ``data:<type>;base64,`` URL (as browsers and
    JavaScript clients write images)."""
    if text.startswith("data:"):
        head, sep, rest = text.partition(",")
        # a data URL of plain text is not base64: decoding it all fails, as it should
        text = rest if sep and head.endswith(";base64") else text
    return base64.b64decode(text, altchars=b"-_" if "-" in text or "_" in text else None, validate=True)


def check_input(name: str, datatype: str, shape, max_images: int | None) -> int:
    """The one input's name and type checked (400), and its element count (413 over
    ``max_images``, the same cap as ``/predict/batch``, counted before any image is decoded)."""
    if name != INPUT:
        raise BadRequest(400, f"unknown input {name!r}; this model takes one input, '{INPUT}'")
    if datatype != "BYTES":
        raise BadRequest(400, f"input '{INPUT}' is BYTES (encoded images), got {datatype!r}")
    shape = list(shape)
    if any(d < 0 for d in shape):
        raise BadRequest(400, f"input '{INPUT}' has shape {shape}: a request's shape has no negative dimension")
    want = math.prod(shape)
    if max_images is not None and want > max_images:
        raise BadRequest(413, f"input '{INPUT}' has shape {shape} ({want:,} images), over the limit of "
                              f"{max_images:,} per request (--max-images); send several requests")
    return want


def check_count(shape, want: int, images: list) -> None:
    if want != len(images):
        raise BadRequest(400, f"input '{INPUT}' has shape {list(shape)} ({want} elements) but {len(images)} images")
    if not images:
        raise BadRequest(400, f"input '{INPUT}' holds no image")


def requested(name: str, classification: int, binary: bool = False, gears: bool = False) -> Requested:
    """One asked-for output, checked: a known name, and top-1 at most."""
    if name not in outputs(gears):
        raise BadRequest(400, f"unknown output {name!r}; this model gives {', '.join(outputs(gears))}")
    if classification > 1:
        raise BadRequest(400, "classification asks for the top 1 only here: a cascade's early answer carries "
                              "no ranking past its first class")
    return Requested(name, binary, classification)


def parse_infer(body: bytes, header_length: str | None, max_images: int | None = None,
                gears: bool = False) -> InferRequest:
    """The request of ``POST /v2/models/{name}/infer``: a JSON body, or a JSON header of
    ``header_length`` bytes followed by binary tensor data, read through
    `OIPRequestSchema`. Anything else is a 400; more than ``max_images``
    images a 413 (the same cap as ``/predict/batch``), counted before any is decoded."""
    if header_length is not None:
        if not DIGITS.fullmatch(header_length.strip()) or int(header_length) > len(body):
            shown = header_length if len(header_length) <= 20 else header_length[:20] + "…"
            raise BadRequest(400, f"Inference-Header-Content-Length {shown!r} is not a length within the "
                                  f"body of {len(body)} bytes")
        n = int(header_length)
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        raw = load_json(head, "the request")
        req = parse(OIPRequestSchema, raw, "the infer request")
    except TinysaverError as e:
        raise BadRequest(400, str(e)) from None
    if len(req.inputs) > 1:  # a second tensor would replace the first, silently
        raise BadRequest(400, f"this model takes one input, '{INPUT}'; the request has {len(req.inputs)}")
    tensor = req.inputs[0]
    want = check_input(tensor.name, tensor.datatype, tensor.shape, max_images)
    size = tensor.parameters.binary_data_size if tensor.parameters else None
    if size is not None:
        if size > len(rest):
            raise BadRequest(400, f"binary_data_size {size} is more than the {len(rest)} bytes after the header")
        images = split_bytes(rest[:size])
    elif tensor.data is not None:
        images = _from_json(tensor.data)
    else:
        raise BadRequest(400, f"input '{INPUT}' has neither data nor binary_data_size")
    check_count(tensor.shape, want, images)
    binary_all = bool(req.parameters and req.parameters.binary_data_output)
    asked = []
    for o in req.outputs or []:
        p = o.parameters
        binary = p.binary_data if p is not None and p.binary_data is not None else binary_all
        asked.append(requested(o.name, (p.classification if p else None) or 0, binary, gears))
    if not asked:
        asked = [Requested(n, binary_all) for n in outputs(gears)]
    return InferRequest(images, asked, None if req.id is None else str(req.id))


def _values(name: str, answers: Sequence[dict]) -> list:
    if name == "class_index":
        return [int(a["class"]) for a in answers]
    if name == "label":
        return [a["name"] if a["name"] is not None else str(a["class"]) for a in answers]
    if name == "confidence":
        return [float(a["confidence"]) for a in answers]
    if name == "gear":
        return [int(a["gear"]) for a in answers]
    return [a["stage_name"] for a in answers]


def binary(datatype: str, values: list) -> bytes:
    if datatype == "BYTES":
        parts = [v.encode() if isinstance(v, str) else v for v in values]
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return struct.pack(f"<{len(values)}{'q' if datatype == 'INT64' else 'f'}", *values)


def tensors(req: InferRequest, answers: Sequence[dict]) -> list[tuple[Requested, str, list[int], list]]:
    """Each asked-for output for ``answers`` (one ``/predict`` answer dict per image): (what was
    asked, datatype, shape, values), whichever encoding then carries them."""
    out = []
    n = len(answers)
    for r in req.outputs:
        values, datatype, shape = _values(r.name, answers), outputs(True)[r.name], [n]
        if r.classification:
            values = [f"{a['confidence']:f}:{int(a['class'])}:{lab}" for a, lab in zip(answers, _values("label", answers))]
            datatype, shape = "BYTES", [n, 1]
        out.append((r, datatype, shape, values))
    return out


def encode_response(name: str, req: InferRequest, answers: Sequence[dict]) -> tuple[bytes, dict[str, str]]:
    """The response body and headers for ``answers`` (one ``/predict`` answer dict per image): JSON, or
    a JSON header and binary data when an output asks for it."""
    outputs, blobs = [], []
    for r, datatype, shape, values in tensors(req, answers):
        out: dict[str, Any] = {"name": r.name, "datatype": datatype, "shape": shape}
        if r.binary:
            blob = binary(datatype, values)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = values
        outputs.append(out)
    head = {"model_name": name, "model_version": VERSION, "outputs": outputs}
    if req.id is not None:
        head["id"] = req.id
    text = json.dumps(head).encode()
    if not blobs:
        return text, {"content-type": "application/json"}
    return text + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "Inference-Header-Content-Length": str(len(text))}


# --- Triton's model endpoints, as far as a cascade has them ------------------------------------------
TRITON_TYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32"}


def model_config(name: str, stages: Sequence[str], thresholds: Sequence[float], max_images: int,
                 max_batch_size: int, batch_wait_ms: float, gears: bool = False) -> dict:
    """Triton's model configuration of the cascade (``GET /v2/models/{name}/config``).

    ``max_batch_size`` is 0 in Triton's sense: the tensors' shapes are whole, ``[-1]`` images, as the
    metadata says, since Triton's batch dimension would make every shape ``[-1, 1]``. How the service
    batches is in ``parameters``: ``max_images`` per request, ``max_batch_size`` per model batch and
    ``batch_wait_ms``; and the cascade itself: its stages and thresholds."""
    tensor = lambda n, t: {"name": n, "data_type": TRITON_TYPES[t], "dims": [-1]}  # noqa: E731
    params = {"stages": ",".join(stages), "thresholds": ",".join(f"{t:.6g}" for t in thresholds),
              "max_images": str(max_images), "max_batch_size": str(max_batch_size),
              "batch_wait_ms": f"{batch_wait_ms:g}"}
    return {"name": name, "platform": "tinysaver_cascade", "backend": "tinysaver", "max_batch_size": 0,
            "version_policy": {"latest": {"num_versions": 1}},
            "input": [tensor(INPUT, "BYTES")], "output": [tensor(k, v) for k, v in outputs(gears).items()],
            "parameters": {k: {"string_value": v} for k, v in params.items()}}


def model_stats(name: str, images: int, batches: int, last_ms: int, ms: dict[str, float], failed: int = 0) -> dict:
    """Triton's inference statistics of the cascade (``GET /v2/models/{name}/stats``) from the counts
    the service keeps: ``images`` answered, model ``batches`` run, ``last_ms`` the time of the last
    answer (ms since the epoch, 0 before any), ``ms``: milliseconds summed over the answered images
    for ``success`` (the server-side latency), ``queue`` (waiting for a batch) and ``compute_infer``
    (the models); ``failed``: images refused after they were admitted."""
    def part(count: int, total_ms: float) -> dict:
        return {"count": count, "ns": int(round(total_ms * 1e6))}

    return {"model_stats": [{"name": name, "version": VERSION, "last_inference": last_ms,
                             "inference_count": images, "execution_count": batches,
                             "inference_stats": {"success": part(images, ms.get("success", 0.0)),
                                                 "fail": part(failed, 0.0),
                                                 "queue": part(images, ms.get("queue", 0.0)),
                                                 "compute_input": part(images, 0.0),
                                                 "compute_infer": part(images, ms.get("compute_infer", 0.0)),
                                                 "compute_output": part(images, 0.0)},
                             "batch_stats": []}]}


def repository_index(name: str, ready: bool) -> list[dict]:
    """Triton's repository index (``POST /v2/repository/index``): the one model this service serves."""
    return [{"name": name, "version": VERSION, "state": "READY" if ready else "UNAVAILABLE",
             "reason": "" if ready else "the cascade is starting or stopping"}]


__all__ = ["EXTENSIONS", "GEAR", "HEADER_LENGTH", "INPUT", "InferRequest", "OUTPUTS", "Requested", "TRITON_TYPES", "binary",
           "check_count", "check_input", "encode_response", "model_config", "model_metadata", "model_name",
           "model_stats", "outputs", "parse_infer", "repository_index", "requested", "split_bytes", "tensors"]
