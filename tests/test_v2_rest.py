"""KServe v2 / Open Inference Protocol over REST: the stock ``tritonclient.http`` against a real
``bentoml serve`` (metadata, readiness, binary tensor data, the API key, the same numbers as
gRPC ModelInfer), and the protocol's edges in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("bentoml")
httpx = pytest.importorskip("httpx")

from tests import test_service_server as served  # noqa: E402
from tests.service_helpers import API_KEY, in_process_service, simulated  # noqa: E402

GRPC_AUTH = served.GRPC_AUTH
server, bags = served.server, served.bags  # the real `bentoml serve` (REST and gRPC ports)

AUTH = {"Authorization": f"Bearer {API_KEY}"}  # copied for tritonclient, which adds to it
INFANT_VEC = np.array([[0.0, 39.0, 3300.0, 12.0]], np.float32)  # = service_helpers.INFANT


def _triton(server):
    http = pytest.importorskip("tritonclient.http")
    return http, http.InferenceServerClient(server["base"].removeprefix("http://"))


def _inputs(http, x: np.ndarray, infant: np.ndarray | None = INFANT_VEC):
    out = [http.InferInput("instances", list(x.shape), "FP32")]
    out[0].set_data_from_numpy(x, binary_data=True)
    if infant is not None:
        out.append(http.InferInput("infant", list(infant.shape), "FP32"))
        out[1].set_data_from_numpy(infant, binary_data=True)
    return out


def test_tritonclient_metadata_ready_and_key(server, bags):
    from tritonclient.utils import InferenceServerException

    http, c = _triton(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("mam")  # no key
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("mam")  # metadata and inference need the key, as over gRPC
    assert e.value.status() == "401" and "unauthorized" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.infer("mam", _inputs(http, bags["absent"][:2]))
    assert e.value.status() == "401"
    with pytest.raises(InferenceServerException) as e:
        c.infer("mam", _inputs(http, bags["absent"][:2]), headers={"Authorization": "Bearer no"})
    assert e.value.status() == "401"

    meta = c.get_model_metadata("mam", headers=dict(AUTH))
    assert meta["name"] == "mam" and [i["name"] for i in meta["inputs"]] == ["instances", "infant"]
    assert meta["inputs"][0] == {"name": "instances", "datatype": "FP32",
                                 "shape": [-1, 240, 3, 17, 17]}  # fmt: skip
    from mam.model.weights import load_meta
    from mam.screening import default_weights

    assert load_meta(default_weights())[0].digest in meta["versions"]  # pinnable, as over gRPC
    c.close()


def test_tritonclient_binary_infer_equals_grpc_model_infer(server, bags):
    from service.grpc_v2.client import V2Client

    http, c = _triton(server)
    freq = {}
    with V2Client(server["grpc"], timeout=120) as g:
        for cat in ("continuous", "absent"):
            x = bags[cat]
            outs = [http.InferRequestedOutput(n, binary_data=True) for n in
                    ("risk_probability", "fms_probability", "fms_frequency", "classification",
                     "in_domain", "domain_score", "attention_weight")]  # fmt: skip
            r = c.infer("mam", _inputs(http, x), outputs=outs, headers=dict(AUTH))
            ref = g.infer("mam", {"instances": x, "infant": INFANT_VEC}, metadata=GRPC_AUTH)
            for name in ("risk_probability", "fms_probability", "fms_frequency",
                         "attention_weight", "classification", "in_domain"):  # fmt: skip
                np.testing.assert_array_equal(r.as_numpy(name), ref[name], err_msg=name)
            np.testing.assert_array_equal(r.as_numpy("domain_score"), ref["domain_score"])
            assert r.as_numpy("fms_probability").shape == (len(x),)
            freq[cat] = float(r.as_numpy("fms_frequency")[0])
            # Without requested outputs: every output, in binary (tritonclient asks for it).
            every = c.infer("mam", _inputs(http, x), headers=dict(AUTH))
            names = [o["name"] for o in every.get_response()["outputs"]]
            assert names == [o.name for o in g.model_metadata("mam", metadata=GRPC_AUTH).outputs]
            for name in names:
                np.testing.assert_array_equal(every.as_numpy(name), ref[name], err_msg=name)
    c.close()
    # Learned behaviour, not only plumbing: the simulated infant's FMs are seen.
    assert freq["continuous"] > freq["absent"] + 0.5, freq


@pytest.fixture(scope="module")
def client(tmp_path_factory, prometheus_dir):
    from starlette.testclient import TestClient

    tmp = tmp_path_factory.mktemp("v2")
    with in_process_service(tmp, prometheus_dir) as app_module:
        with TestClient(app_module.Screening.to_asgi()) as c:
            yield c


def _binary_request(x: np.ndarray, header: dict | None = None) -> tuple[bytes, dict]:
    raw = np.ascontiguousarray(x, "<f4").tobytes()
    head = header or {
        "inputs": [
            {
                "name": "instances",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(raw)},
            }
        ],  # fmt: skip
        "outputs": [
            {"name": "risk_probability", "parameters": {"binary_data": True}},
            {"name": "fms_probability"},
        ],  # fmt: skip
    }
    text = json.dumps(head).encode()
    headers = AUTH | {"Inference-Header-Content-Length": str(len(text))}
    return text + raw, headers


def test_binary_and_json_requests_agree_with_screen_instances(client):
    x = simulated("continuous", 3, 20.0)[2]
    body, headers = _binary_request(x)
    r = client.post("/v2/models/mam/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    (risk_out, fms_out) = head["outputs"]
    assert risk_out["parameters"]["binary_data_size"] == 4 and "data" not in risk_out
    risk = np.frombuffer(r.content[n : n + 4], "<f4")[0]
    assert len(r.content) == n + 4 and fms_out["shape"] == [len(x)]

    data = {"inputs": [{"name": "instances", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip
    j = client.post("/v2/models/mam/infer", json=data, headers=AUTH).json()
    by_name = {o["name"]: o["data"] for o in j["outputs"]}
    files = {"instances": ("x.npy", _npy(x), "application/octet-stream")}
    rest = client.post("/screen_instances", files=files, headers=AUTH).json()
    assert by_name["risk_probability"][0] == pytest.approx(rest["risk_probability"], abs=1e-4)
    assert risk == pytest.approx(rest["risk_probability"], abs=1e-4)
    assert np.allclose(fms_out["data"], rest["fms_probability"], atol=1e-4)


def _npy(x):
    import io

    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    "case, status, code",
    [
        ("no_key", 401, "unauthorized"),
        ("unknown_model", 404, "not_found"),
        ("header_longer_than_body", 400, "malformed_request"),
        ("header_length_not_ascii", 400, "malformed_request"),
        ("binary_size_not_a_number", 422, "invalid_tensor"),
        ("not_json", 400, "malformed_request"),
        ("short_binary", 422, "invalid_tensor"),
        ("extra_bytes", 400, "malformed_request"),
        ("wrong_shape", 422, "invalid_tensor"),
        ("wrong_datatype", 422, "invalid_tensor"),
        ("unknown_output", 400, "invalid_request"),
        ("huge_shape", 422, "invalid_tensor"),
        ("get_infer", 405, "method_not_allowed"),
    ],
)
def test_protocol_errors_are_typed(client, case, status, code):
    x = np.zeros((1, 240, 3, 17, 17), np.float32)
    body, headers = _binary_request(x)
    path, method = "/v2/models/mam/infer", "POST"
    n = int(headers["Inference-Header-Content-Length"])
    if case == "no_key":
        headers.pop("Authorization")
    elif case == "unknown_model":
        path = "/v2/models/other/infer"
    elif case == "header_longer_than_body":
        headers["Inference-Header-Content-Length"] = str(len(body) + 1)
    elif case == "header_length_not_ascii":
        headers["Inference-Header-Content-Length"] = "\u00b2".encode("latin-1")
    elif case == "binary_size_not_a_number":
        body = body.replace(
            b'"binary_data_size": %d' % (len(body) - n), b'"binary_data_size": true'
        )
        headers["Inference-Header-Content-Length"] = str(n - len(str(len(body) - n)) + 4)
    elif case == "not_json":
        body = b"[not json" + body[9:]
    elif case == "short_binary":
        body = body[:-4]
    elif case == "extra_bytes":
        body += b"\0\0\0\0"
    elif case in ("wrong_shape", "wrong_datatype", "unknown_output", "huge_shape"):
        head = json.loads(body[:n])
        t = head["inputs"][0]
        if case == "wrong_shape":
            t["shape"] = [1, 240, 3, 17, 16]
        elif case == "wrong_datatype":
            t["datatype"] = "FP64"
        elif case == "huge_shape":
            t["shape"] = [2**40, 240, 3, 17, 17]
        else:
            head["outputs"] = [{"name": "secret_weights"}]
        body, headers = _binary_request(x, head)
    elif case == "get_infer":
        method = "GET"
    r = client.request(method, path, content=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err, str) and err.startswith(code + ":"), err
    assert r.headers["x-mam-error-code"] == code
    assert "Traceback" not in r.text


def test_v2_routes_are_metered_by_name(client):
    client.get("/v2/models/mam", headers=AUTH)
    text = client.get("/metrics").text
    assert 'endpoint="v2_model_metadata",protocol="rest"' in text
    assert 'endpoint="v2_model_infer",protocol="rest"' in text


def test_an_inference_is_audited_once_with_ids_and_digest_only(client):
    """One audit line per v2 REST inference, as for gRPC: protocol, key id, content digest,
    outcome; never a key or the tensors."""
    import hashlib
    import logging

    from service.app import AUDIT

    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Lines()
    AUDIT.add_handler(handler)
    try:
        x = simulated("absent", 4, 20.0)[2]
        body, headers = _binary_request(x)
        assert client.post("/v2/models/mam/infer", content=body, headers=headers).status_code == 200
    finally:
        AUDIT._logger.removeHandler(handler)
    (line,) = [json.loads(s) for s in lines]
    assert (line["route"], line["protocol"], line["outcome"]) == ("model_infer", "rest", "ok")
    assert line["content_sha256"] == hashlib.sha256(x.astype("<f4").tobytes()).hexdigest()
    assert line["api_key_id"] not in ("none", API_KEY) and API_KEY not in json.dumps(line)
    assert line["request_id"]
