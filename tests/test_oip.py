"""The Open Inference Protocol's parsing and encoding, and the Prometheus text, without Ray: requests
built by clients we did not write (tritonclient, kserve) parse, and our responses parse in them."""
import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import need_package
from tinysaver.serve import oip
from tinysaver.serve.http import BadRequest

ROOT = Path(__file__).resolve().parent.parent
IMAGES = [b"\x89PNG\r\n\x1a\nfirst", b"\xff\xd8\xffsecond\x00\x00", b"third"]
ANSWERS = [{"class": 3, "name": "Dress", "confidence": 0.75, "stage_name": "saver"},
           {"class": 1, "name": "Trouser", "confidence": 0.5, "stage_name": "base"},
           {"class": 0, "name": None, "confidence": 0.25, "stage_name": "base"}]


def triton_request(outputs=None):
    need_package("tritonclient")
    import tritonclient.http as th
    from tritonclient.http._utils import _get_inference_request

    tensor = th.InferInput("image", [len(IMAGES)], "BYTES")
    tensor.set_data_from_numpy(np.array(IMAGES, dtype=np.object_))
    body, n = _get_inference_request([tensor], "", outputs, 0, False, False, 0, None, None)
    return body, None if n is None else str(n)


def test_a_service_with_gears_gives_the_gear_as_an_output_and_one_without_refuses_it():
    geared = [{**a, "gear": g} for a, g in zip(ANSWERS, (2, 0, 1))]
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                                   "data": [base64.b64encode(i).decode() for i in IMAGES]}]}).encode()
    req = oip.parse_infer(body, None, gears=True)
    assert [o.name for o in req.outputs] == [*oip.OUTPUTS, "gear"]  # none named: all of them, the gear too
    out, _ = oip.encode_response("m-cascade", req, geared)
    got = {o["name"]: (o["datatype"], o["data"]) for o in json.loads(out)["outputs"]}
    assert got["gear"] == ("INT64", [2, 0, 1]) and got["class_index"] == ("INT64", [3, 1, 0])
    assert [o.name for o in oip.parse_infer(body, None).outputs] == list(oip.OUTPUTS)
    asks_gear = json.dumps({**json.loads(body), "outputs": [{"name": "gear"}]}).encode()
    with pytest.raises(BadRequest, match="unknown output 'gear'; this model gives class_index, label, confidence, stage$"):
        oip.parse_infer(asks_gear, None)
    assert [o.name for o in oip.parse_infer(asks_gear, None, gears=True).outputs] == ["gear"]
    assert [o["name"] for o in oip.model_metadata("m", gears=True)["outputs"]][-1] == "gear"
    assert "gear" not in [o["name"] for o in oip.model_metadata("m")["outputs"]]
    assert oip.model_config("m", ["a", "b"], [0.5], 8, 16, 5.0, gears=True)["output"][-1] == {
        "name": "gear", "data_type": "TYPE_INT64", "dims": [-1]}


def test_tritonclient_binary_requests_and_responses_round_trip():
    import tritonclient.http as th

    body, n = triton_request()
    req = oip.parse_infer(body, n)
    assert req.images == IMAGES and [o.name for o in req.outputs] == list(oip.OUTPUTS)
    assert all(o.binary for o in req.outputs)  # no outputs named: tritonclient asks for binary ones
    out, headers = oip.encode_response("m-cascade", req, ANSWERS)
    res = th.InferResult.from_response_body(out, header_length=int(headers["Inference-Header-Content-Length"]))
    assert res.as_numpy("class_index").tolist() == [3, 1, 0]
    assert res.as_numpy("label").tolist() == [b"Dress", b"Trouser", b"0"]
    np.testing.assert_allclose(res.as_numpy("confidence"), [0.75, 0.5, 0.25])
    assert res.as_numpy("stage").tolist() == [b"saver", b"base", b"base"]
    # the classification extension: "<score>:<index>:<label>", as Triton gives it
    body, n = triton_request([th.InferRequestedOutput("label", binary_data=False, class_count=1)])
    req = oip.parse_infer(body, n)
    out, headers = oip.encode_response("m-cascade", req, ANSWERS)
    assert "Inference-Header-Content-Length" not in headers
    res = th.InferResult.from_response_body(out)
    assert res.as_numpy("label").tolist() == [["0.750000:3:Dress"], ["0.500000:1:Trouser"], ["0.250000:0:0"]]


def test_base64_images_may_be_url_safe_or_data_urls():
    """What browsers and JavaScript clients send: URL-safe base64 and data URLs decode to the same bytes."""
    blob = bytes(range(256)) * 3  # every byte value: both alphabets' extra characters appear
    forms = [base64.b64encode(blob).decode(), base64.urlsafe_b64encode(blob).decode(),
             "data:image/png;base64," + base64.b64encode(blob).decode()]
    body = json.dumps({"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": forms}]}).encode()
    assert oip.parse_infer(body, None).images == [blob] * 3
    for bad in ("data:image/png,plain", "abc"):  # a data URL not in base64; unpadded
        body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [bad]}]}).encode()
        with pytest.raises(BadRequest, match="URL-safe base64 .* or a data URL"):
            oip.parse_infer(body, None)


def test_kserve_json_requests_with_base64_images_parse():
    need_package("kserve")
    from kserve import InferInput, InferRequest

    tensor = InferInput(name="image", shape=[3], datatype="BYTES", data=[base64.b64encode(x).decode() for x in IMAGES])
    rest, _ = InferRequest(model_name="m-cascade", infer_inputs=[tensor], request_id="r1").to_rest()
    req = oip.parse_infer(json.dumps(rest).encode(), None)
    assert req.images == IMAGES and req.id == "r1" and not any(o.binary for o in req.outputs)
    out, headers = oip.encode_response("m-cascade", req, ANSWERS)
    body = json.loads(out)
    assert headers["content-type"] == "application/json" and body["id"] == "r1"
    got = {o["name"]: o["data"] for o in body["outputs"]}
    assert got == {"class_index": [3, 1, 0], "label": ["Dress", "Trouser", "0"], "confidence": [0.75, 0.5, 0.25],
                   "stage": ["saver", "base", "base"]}


ONE = {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}


@pytest.mark.parametrize("body,header,words", [
    (b"{not json", None, "not JSON"),
    (json.dumps({"inputs": []}).encode(), None, "inputs: needs at least 1 item"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}]}).encode(), None,
     "unknown input 'x'"),
    (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode(), None,
     "is BYTES"),
    (json.dumps({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]}).encode(), None,
     "shape [2] (2 elements) but 1 images"),
    (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}).encode(),
     None, "not base64"),
    (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}],
                 "outputs": [{"name": "label", "parameters": {"classification": 3}}]}).encode(), None, "top 1 only"),
    (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}],
                 "outputs": [{"name": "logits"}]}).encode(), None, "unknown output 'logits'"),
    (b'{"inputs": []}', "999", "not a length within the body"),
    (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGk="]}] * 2}).encode(),
     None, "takes one input, 'image'; the request has 2"),
    (json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                             "parameters": {"binary_data_size": 9}}]}).encode() + b"\x05\x00\x00\x00ab", "86",
     "binary_data_size 9 is more than"),
    # the hostile trial's: each was a plain-text 500, or (binary_data_output "false") a silent wrong answer
    (b"[" * 100_000, None, "nested more than 32 deep"),
    (json.dumps({"inputs": [ONE], "parameters": [1]}).encode(), None, "parameters: must be a mapping"),
    (json.dumps({"inputs": [ONE], "parameters": "abc"}).encode(), None, "parameters: must be a mapping"),
    (json.dumps({"inputs": [ONE], "outputs": 5}).encode(), None, "outputs: must be a list, got 5"),
    (json.dumps({"inputs": [ONE], "parameters": {"binary_data_output": "false"}}).encode(), None,
     "parameters.binary_data_output: must be true or false, got 'false' (text)"),
    (json.dumps({"inputs": [ONE]}).encode(), "\u00b2", "is not a length within the body"),  # str.isdigit() takes it
    (json.dumps({"inputs": [ONE]}).encode(), "7" * 5000, "is not a length within the body"),
    (json.dumps({"inputs": [{**ONE, "shape": [1.5]}]}).encode(), None, "inputs[0].shape[0]: must be an integer"),
])
def test_bad_infer_requests_are_one_400_line(body, header, words):
    if header == "86":
        header = str(body.index(b"\x05"))
    with pytest.raises(BadRequest) as e:
        oip.parse_infer(body, header)
    assert e.value.status == 400 and words in e.value.reason and "\n" not in e.value.reason
    assert len(e.value.reason) < 300


def test_an_infer_request_has_the_batch_routes_item_cap():
    """100,000 base64 1×1 PNGs in one OIP request held every other client for 25 s; the count is
    refused from the shape, before any image is decoded."""
    body = json.dumps({"inputs": [{"name": "image", "shape": [300], "datatype": "BYTES", "data": ["aGk="] * 300}]})
    with pytest.raises(BadRequest) as e:
        oip.parse_infer(body.encode(), None, max_images=256)
    assert e.value.status == 413 and "300 images), over the limit of 256 per request" in e.value.reason
    assert len(oip.parse_infer(body.encode(), None, max_images=300).images) == 300


def sample_stats() -> dict:
    return {"stages": ["mobilenetv3_small_075", "resnet10t"], "thresholds": [0.897, None],
            "exits": {"mobilenetv3_small_075": 7, "resnet10t": 3},
            "exit_ratio": {"mobilenetv3_small_075": 0.7, "resnet10t": 0.3},
            "batch_sizes": {"fused": {1: 2, 8: 1}, "fused:mobilenetv3_small_075": {1: 2, 8: 1},
                            "fused:resnet10t": {3: 1}},
            "audit": {"state": "certified", "audited": 4, "loss_points": {"lower": 0.0, "upper": 1.25}}}


def parsed_families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_are_prometheus_text_in_base_units():
    need_package("prometheus_client")
    from tinysaver.serve import prom

    prom.HTTP_REQUESTS.labels("/predict", "200").inc()
    prom.LATENCY.observe(0.012)
    fams = parsed_families(prom.render(sample_stats()).decode())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("tinysaver_http_requests_total", (("route", "/predict"), ("status", "200")))] >= 1
    assert samples[("tinysaver_answers_total", (("stage", "resnet10t"),))] == 3
    assert samples[("tinysaver_exit_ratio", (("stage", "mobilenetv3_small_075"),))] == 0.7
    assert samples[("tinysaver_threshold", (("stage", "mobilenetv3_small_075"),))] == 0.897
    assert ("tinysaver_threshold", (("stage", "resnet10t"),)) not in samples  # the base never exits early
    assert samples[("tinysaver_audit_state", (("state", "certified"),))] == 1
    assert samples[("tinysaver_audit_state", (("state", "drift"),))] == 0
    assert samples[("tinysaver_audit_loss_upper_bound_ratio", ())] == 0.0125
    assert samples[("tinysaver_batch_size_count", (("stage", "mobilenetv3_small_075"),))] == 3
    assert samples[("tinysaver_batch_size_sum", (("stage", "requests"),))] == 10
    assert samples[("tinysaver_batch_size_bucket", (("le", "4.0"), ("stage", "mobilenetv3_small_075")))] == 2
    assert fams["tinysaver_request_duration_seconds"].type == "histogram"


def dashboard_metric_names() -> set[str]:
    board = json.loads((ROOT / "deploy" / "grafana" / "tinysaver.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return {re.sub(r"_(bucket|sum|count|total)$", "", m) for e in exprs for m in re.findall(r"\btinysaver_\w+", e)}


def test_every_dashboard_query_names_a_metric_the_service_exports():
    need_package("prometheus_client")
    from tinysaver.serve import prom

    exported = {re.sub(r"_total$", "", n) for n in parsed_families(prom.render(sample_stats()).decode())}
    names = dashboard_metric_names()
    assert names and names <= exported, names - exported
    # the panels the dashboard promises: throughput, p50/p99 latency, answers (and exit ratio) per stage, the audit
    assert {"tinysaver_http_requests", "tinysaver_request_duration_seconds", "tinysaver_answers",
            "tinysaver_audit_state", "tinysaver_audit_loss_upper_bound_ratio"} <= names


def test_the_dashboard_shows_rates_of_user_traffic_per_job_and_instance_and_says_when_the_audit_is_off():
    from tinysaver.serve.routes import ROUTES

    board = json.loads((ROOT / "deploy" / "grafana" / "tinysaver.json").read_text())
    assert {"job", "instance"} <= {v["name"] for v in board["templating"]["list"]}
    for panel in board["panels"]:
        for t in panel["targets"]:
            e = t["expr"]
            for selector in re.findall(r"tinysaver_\w+(\{[^}]*\})?", e):
                assert 'job=~"$job"' in selector and 'instance=~"$instance"' in selector, e
            for m in re.findall(r"tinysaver_\w+_(?:total|sum|count|bucket)\b", e):  # counters only as rates
                assert re.search(rf"rate\({m}\{{", e), (m, e)
    # throughput counts the routes that answer images, not probes and scrapes
    user = re.search(r'route=~"([^"]+)"', board["panels"][0]["targets"][0]["expr"]).group(1)
    for r in ROUTES:
        path = r.path.replace("{name}", "m-cascade").replace("{version}", "1")
        assert bool(re.fullmatch(user, path)) == (r.handler in ("predict", "predict_batch", "oip_infer")), r.path
    audit = [p for p in board["panels"] if "tinysaver_audit" in p["targets"][0]["expr"]]
    assert audit and all("--audit" in p["fieldConfig"]["defaults"]["noValue"] for p in audit)


def test_grpc_requests_built_by_kserve_parse_and_our_responses_read_back_in_it():
    """The protocol over gRPC without Ray: kserve's client-side request (bytes_contents or raw input
    contents) parses to the same images; our response reads back in kserve's InferResponse; refusals
    carry the HTTP route's status."""
    need_package("kserve")
    from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse, RequestedOutput

    from tinysaver.serve import oip_grpc

    msg = InferRequest(model_name="m-cascade", request_id="r1", infer_inputs=[InferInput(
        "image", [len(IMAGES)], "BYTES", data=IMAGES)]).to_grpc()
    wire = oip_grpc.request("ModelInfer", msg.SerializeToString())  # what the replica gets: bytes
    req = oip_grpc.parse_infer(wire)
    assert req.images == IMAGES and req.id == "r1" and [o.name for o in req.outputs] == list(oip.OUTPUTS)
    res = InferResponse.from_grpc(oip_grpc.infer_response("m-cascade", req, ANSWERS))
    out = {o.name: o.as_numpy().tolist() for o in res.outputs}
    assert out["class_index"] == [3, 1, 0] and out["stage"] == [b"saver", b"base", b"base"]
    np.testing.assert_allclose(out["confidence"], [0.75, 0.5, 0.25])
    assert res.id == "r1" and res.model_name == "m-cascade"
    geared = InferResponse.from_grpc(oip_grpc.infer_response(  # a service with gears: the gear too
        "m-cascade", oip_grpc.parse_infer(wire, gears=True), [{**a, "gear": 1} for a in ANSWERS]))
    assert {o.name: o.as_numpy().tolist() for o in geared.outputs}["gear"] == [1, 1, 1]
    assert [t.name for t in oip_grpc.model_metadata("m", gears=True).outputs][-1] == "gear"
    # the same images as raw_input_contents (Triton's clients send these)
    raw = oip_grpc.messages().ModelInferRequest(model_name="m-cascade")
    raw.inputs.add(name="image", datatype="BYTES", shape=[len(IMAGES)])
    raw.raw_input_contents.append(b"".join(len(x).to_bytes(4, "little") + x for x in IMAGES))
    assert oip_grpc.parse_infer(raw).images == IMAGES
    top = InferRequest(model_name="m-cascade", infer_inputs=[InferInput("image", [3], "BYTES", data=IMAGES)],
                       request_outputs=[RequestedOutput("label", parameters={"classification": 1})]).to_grpc()
    got = InferResponse.from_grpc(oip_grpc.infer_response("m-cascade", oip_grpc.parse_infer(top), ANSWERS))
    assert [o.name for o in got.outputs] == ["label"] and got.outputs[0].shape == [3, 1]
    assert got.outputs[0].as_numpy().ravel().tolist() == [b"0.750000:3:Dress", b"0.500000:1:Trouser", b"0.250000:0:0"]
    with pytest.raises(BadRequest, match="over the limit of 2 per request") as e:
        oip_grpc.parse_infer(msg, max_images=2)
    assert e.value.status == 413
    short = oip_grpc.messages().ModelInferRequest()
    short.CopyFrom(raw)
    short.inputs[0].shape[:] = [4]
    with pytest.raises(BadRequest, match=r"shape \[4\] \(4 elements\) but 3 images"):
        oip_grpc.parse_infer(short)
    with pytest.raises(BadRequest, match="not a protobuf message") as e:
        oip_grpc.request("ModelInfer", b"\xff\xff\xff")
    assert e.value.status == 400
    with pytest.raises(BadRequest, match="takes one input"):
        oip_grpc.parse_infer(oip_grpc.messages().ModelInferRequest(model_name="m"))
