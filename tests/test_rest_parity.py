"""TF Serving's own REST tests, ported: every applicable case of
tensorflow_serving/model_servers/http_rest_api_handler_test.cc (HttpRestApiHandlerTest, against the local
server over HTTP, adapted to a PatchNet export) and tensorflow_serving/util/json_tensor_test.cc
(JsontensorTest, ClassifyRegressRequestTest, MakeJsonFromTensors: the JSON <-> proto conversion, called
directly), plus URL handling read from http_rest_api_handler.cc and http_rest_api_util.cc. Each case
names the TF Serving test it comes from.

Not ported (they need a signature PatchNet never exports): HttpRestApiHandlerTest.Classify and .Regress
(successful calls on classify/regress signatures) and ClassifyRegressnResultTest (writing their
results). What TF Serving answers :classify and :regress on a predict-only model instead is checked
below from classifier.cc and regressor.cc.
"""

import base64
import http.client
import json
import math
import re
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import json_format, text_format
from tensorflow.core.example import example_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    model_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)
from tensorflow_serving.config import model_server_config_pb2
from test_serving import MODEL, PREPROCESSING, TOLERANCE, expected, images, tiny_model

from pipelines.export import write_saved_model
from pipelines.push import copy_version
from serving.errors import ServingError
from serving.rest import classify_regress_request, error_json, predict_request, response_json
from serving.server import start_server

LABEL = "stable"  # kTestModelVersionLabel, on version 1 as theirs is on 123
GOOD = images(1)[0]


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


@pytest.fixture(scope="module")
def rest(tmp_path_factory):
    """HttpRestApiHandlerTest::CreateServerCore: one model, one version, a label added by a reload."""
    model = tiny_model(0)
    root = tmp_path_factory.mktemp("parity")
    export = write_saved_model(model, PREPROCESSING, str(root / "export"))
    copy_version(export, str(root / MODEL), 1)
    server = start_server(str(root / MODEL), MODEL, port=0, poll_seconds=0.2, rest_api_port=0)
    server.wait_for_version(1)
    config = model_server_config_pb2.ModelServerConfig()
    config.CopyFrom(server.core.config)
    config.model_config_list.config[0].version_labels[LABEL] = 1
    server.core.reload_config(config)
    yield server, model, export
    server.stop()


def call(server, method, path, body=b""):
    """(HTTP status, Content-Type, body text) of one raw call (no URL normalisation by a client library)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=60)
    try:
        connection.request(method, path, body=body if method not in ("GET", "HEAD") else None)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        connection.close()


def error_of(server, method, path, body=b""):
    status, _, text = call(server, method, path, body)
    return status, json.loads(text)["error"]


def meta_graph(export):
    saved_model = saved_model_pb2.SavedModel()
    with open(f"{export}/saved_model.pb", "rb") as file:
        saved_model.ParseFromString(file.read())
    return saved_model.meta_graphs[0]


# ---- HttpRestApiHandlerTest ----

def test_kPathRegex(rest):
    """HttpRestApiHandlerTest.kPathRegex: /v1/models is the REST API's; other paths are not answered by it."""
    server, _, _ = rest
    assert call(server, "GET", "/v1/models")[0] == 400  # the handler's: Missing model name
    for path in ("/statuspage", "/index"):
        status, content_type, _ = call(server, "GET", path)
        assert status == 404 and content_type.startswith("text/plain")


UNSUPPORTED_API_CALLS = [  # HttpRestApiHandlerTest.UnsupportedApiCalls, in its order
    ("GET", "/v1/foo", "Malformed request"),
    ("POST", "/v1/foo", "Malformed request"),
    ("GET", "/v1/models", "Missing model name"),
    ("GET", "/v1/models/debug/model_name", "Malformed request"),
    ("POST", "/v1/models", "Malformed request"),
    ("GET", "/v1/models/foo:predict", "Malformed request"),
    ("GET", "/v1/models/foo/version/50:predict", "Malformed request"),
    ("POST", "/v1/models/foo/version/50:regress", "Malformed request"),
    ("POST", "/v1/models/foo/versions/HELLO:regress", "Malformed request"),
    ("POST", f"/v1/models/foo/versions/{2**64 - 1}:regress", "Failed to convert version"),
    ("POST", "/v1/models/foo/metadata", "Malformed request"),
    ("POST", "/v1/models/foo/label/some_label:regress", "Malformed request"),
    ("POST", "/v1/models/foo/versions/50/labels/some_label:regress", "Malformed request"),
    ("POST", "/v1/models/foo/versions/some_label:regress", "Malformed request"),
]


@pytest.mark.parametrize("method, path, message", UNSUPPORTED_API_CALLS)
def test_UnsupportedApiCalls(rest, method, path, message):
    """HttpRestApiHandlerTest.UnsupportedApiCalls: INVALID_ARGUMENT (HTTP 400)."""
    server, _, _ = rest
    status, error = error_of(server, method, path)
    assert status == 400 and message in error, error


@pytest.mark.parametrize("path", ["/v1/models/foo:predict", "/v1/models/foo/versions/50:predict",
                                  f"/v1/models/{MODEL}99:predict"])
def test_PredictModelNameVersionErrors(rest, path):
    """HttpRestApiHandlerTest.PredictModelNameVersionErrors: NOT_FOUND (HTTP 404)."""
    server, _, _ = rest
    status, error = error_of(server, "POST", path, b'{ "instances": [1] }')
    assert status == 404 and error.startswith("Servable not found for request: "), error


PREDICT = f"/v1/models/{MODEL}:predict"
PREDICT_REQUEST_ERRORS = [  # HttpRestApiHandlerTest.PredictRequestErrors (float inputs: classify_images)
    (PREDICT, b"", "JSON Parse error: The document is empty"),
    (PREDICT, b"instances = [1, 2]", "JSON Parse error: Invalid value"),
    (PREDICT, b'{"signature_name": "classify_images", "instances": ["x", "y"]}', "not of expected type: float"),
    (f"/v1/models/{MODEL}/labels/nonexistent_label:predict", b'{ "instances": ["x", "y"] }',
     "Unrecognized servable version label"),
    (PREDICT, b'{ "signature_name": 100 }', "'signature_name' key must be a string value."),
]


@pytest.mark.parametrize("path, body, message", PREDICT_REQUEST_ERRORS)
def test_PredictRequestErrors(rest, path, body, message):
    """HttpRestApiHandlerTest.PredictRequestErrors: INVALID_ARGUMENT (HTTP 400)."""
    server, _, _ = rest
    status, error = error_of(server, "POST", path, body)
    assert status == 400 and message in error, error


@pytest.mark.parametrize("path, body, key", [  # HttpRestApiHandlerTest.Predict: five calls
    (PREDICT, {"instances": [b64(GOOD)]}, "predictions"),
    (f"/v1/models/{MODEL}/versions/1:predict", {"instances": [b64(GOOD)]}, "predictions"),
    (f"/v1/models/{MODEL}/labels/{LABEL}:predict", {"instances": [b64(GOOD)]}, "predictions"),
    (f"/v1/models/{MODEL}/versions/1:predict", {"signature_name": "serving_default", "instances": [b64(GOOD)]},
     "predictions"),
    (f"/v1/models/{MODEL}/versions/1:predict", {"signature_name": "serving_default", "inputs": [b64(GOOD)]},
     "outputs"),
])
def test_Predict(rest, path, body, key):
    """HttpRestApiHandlerTest.Predict: 200, Content-Type application/json, the model's answer."""
    server, model, _ = rest
    status, content_type, text = call(server, "POST", path, json.dumps(body).encode())
    assert status == 200 and content_type == "application/json", text
    answer = json.loads(text)[key]
    probability = [row["probability"] for row in answer] if key == "predictions" else answer["probability"]
    np.testing.assert_allclose(probability, expected(model, [GOOD])[0], atol=TOLERANCE)


@pytest.mark.parametrize("path", [f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/versions/1",
                                  f"/v1/models/{MODEL}/labels/{LABEL}"])
def test_GetStatus(rest, path):
    """HttpRestApiHandlerTest.GetStatus: the same document for the model, its version and its label."""
    server, _, _ = rest
    status, content_type, text = call(server, "GET", path)
    assert status == 200 and content_type == "application/json"
    assert json.loads(text) == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}


def test_GetModelMetadata(rest):
    """HttpRestApiHandlerTest.GetModelMetadata: the model spec and every SignatureDef of the SavedModel
    (get_model_metadata_impl.cc copies them all, __saved_model_init_op included)."""
    server, _, export = rest
    status, content_type, text = call(server, "GET", f"/v1/models/{MODEL}/metadata")
    assert status == 200 and content_type == "application/json"
    answer = json.loads(text)
    assert answer["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    signature_defs = dict(meta_graph(export).signature_def)
    assert "__saved_model_init_op" in signature_defs
    assert answer["metadata"]["signature_def"]["signature_def"] == {
        name: json_format.MessageToDict(signature, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
        for name, signature in signature_defs.items()}


# ---- URL handling (http_rest_api_handler.cc ProcessRequest, http_rest_api_util.cc ParseModelInfo) ----

def test_methods_other_than_get_and_post_are_malformed_requests(rest):
    """ProcessRequest dispatches POST and GET only; HEAD, PUT and DELETE keep "Malformed request" (400)."""
    server, _, _ = rest
    for method in ("PUT", "DELETE"):
        assert error_of(server, method, PREDICT) == (400, f"Malformed request: {method} {PREDICT}")
    status, _, text = call(server, "HEAD", f"/v1/models/{MODEL}")
    assert status == 400 and text == ""  # an answer to HEAD has no body


def test_model_name_and_label_are_percent_decoded_and_bad_escapes_refused(rest):
    """ParseModelInfo decodes the name and label (curl_easy_unescape); a malformed escape never reaches
    it, libevent answers 400."""
    server, model, _ = rest
    status, _, text = call(server, "POST", "/v1/models/patch%6Eet:predict", json.dumps({"instances": [b64(GOOD)]})
                           .encode())
    assert status == 200
    assert error_of(server, "GET", "/v1/models/patch%zznet") == (400, "Failed to decode model name:patch%zznet")
    assert error_of(server, "GET", f"/v1/models/{MODEL}/labels/st%4") == (
        400, "Failed to decode model version label:st%4")


def test_path_is_case_insensitive_but_the_method_name_is_not(rest):
    """The path regexes are (?i); ProcessRequest compares the method (":predict") case-sensitively."""
    server, _, _ = rest
    assert call(server, "GET", f"/V1/MODELS/{MODEL}/VERSIONS/1")[0] == 200
    status, error = error_of(server, "POST", f"/v1/models/{MODEL}:PREDICT", b'{"instances": []}')
    assert (status, error) == (400, f"Malformed request: POST /v1/models/{MODEL}:PREDICT")


# ---- :classify and :regress on a predict-only model (classifier.cc, regressor.cc) ----

def signature_text(export, name):
    return text_format.MessageToString(meta_graph(export).signature_def[name])


def test_classify_and_regress_answer_as_tf_serving_on_predict_signatures(rest):
    server, _, export = rest
    examples = json.dumps({"examples": [{"x": 1.0}]}).encode()
    with_signature = json.dumps({"signature_name": "heatmap", "examples": [{"x": 1.0}]}).encode()
    assert error_of(server, "POST", f"/v1/models/{MODEL}:classify", examples) == (
        400, f"No classification inputs found in SignatureDef: {signature_text(export, 'serving_default')}")
    assert error_of(server, "POST", f"/v1/models/{MODEL}/versions/1:classify", with_signature) == (
        400, f"No classification inputs found in SignatureDef: {signature_text(export, 'heatmap')}")
    assert error_of(server, "POST", f"/v1/models/{MODEL}:regress", examples) == (400, "Expected one output Tensor.")
    assert error_of(server, "POST", f"/v1/models/{MODEL}/labels/{LABEL}:regress",
                    b'{"signature_name": "__saved_model_init_op", "examples": [{}]}') == (
        400, "Expected one input Tensor.")
    assert error_of(server, "POST", f"/v1/models/{MODEL}:classify",
                    b'{"signature_name": "nope", "examples": [{}]}') == (
        400, "No signature was found with the name: nope")
    # The JSON is read first (400), then the model looked up (404).
    assert error_of(server, "POST", "/v1/models/nope:classify", b'{"examples": {}}')[0] == 400
    assert error_of(server, "POST", "/v1/models/nope:regress", examples) == (
        404, "Servable not found for request: Latest(nope)")


def test_classify_and_regress_over_grpc_give_the_same_answers(rest):
    server, _, export = rest
    with grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = classification_pb2.ClassificationRequest()
        request.model_spec.name = MODEL
        request.input.example_list.examples.add()
        with pytest.raises(grpc.RpcError) as error:
            stub.Classify(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details() == (
            f"No classification inputs found in SignatureDef: {signature_text(export, 'serving_default')}")
        request = regression_pb2.RegressionRequest()
        request.model_spec.name = "nope"
        with pytest.raises(grpc.RpcError) as error:
            stub.Regress(request)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


# ---- JsontensorTest: JSON -> PredictRequest (FillPredictRequestFromJson) ----

def fill(body, types):
    """FillPredictRequestFromJson with a fixed info map: (input name -> ndarray, "row" or "columnar", request)."""
    if isinstance(body, str):
        body = body.encode()
    request, layout = predict_request(body, model_pb2.ModelSpec(name="m"), lambda spec: types)
    return {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}, layout, request


def fill_error(body, types):
    with pytest.raises(ServingError) as error:
        fill(body, types)
    assert error.value.code == "INVALID_ARGUMENT"
    return error.value.message


def test_SingleUnnamedTensor():
    """JsontensorTest.SingleUnnamedTensor"""
    inputs, layout, _ = fill('{"instances": [[1,2],[3,4],[5,6]]}', {"default": tf.int32})
    assert layout == "row" and inputs["default"].dtype == np.int32
    np.testing.assert_array_equal(inputs["default"], [[1, 2], [3, 4], [5, 6]])


def test_DeeplyNestedWellFormed():
    """JsontensorTest.DeeplyNestedWellFormed: 500,000 levels in a member that is no input."""
    body = '{"instances":[1], "nested":' + "[" * 500_000 + "]" * 500_000 + "}"
    inputs, _, _ = fill(body, {"default": tf.int32})
    assert list(inputs) == ["default"]


def test_DeeplyNestedMalformed():
    """JsontensorTest.DeeplyNestedMalformed"""
    body = '{"signature_name":' + "[" * 500_000 + "]" * 500_000 + "}"
    assert "key must be a string value" in fill_error(body, {"default": tf.int32})


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_MixedInputForFloatTensor_and_MixedInputForDoubleTensor(dtype):
    """JsontensorTest.MixedInputForFloatTensor, .MixedInputForDoubleTensor: integers and decimals mix."""
    values = [1, 2.0, 3, 4, 5.003, 0.007, 0.0]
    inputs, _, _ = fill(json.dumps({"instances": values}), {"default": dtype})
    assert inputs["default"].dtype == dtype.as_numpy_dtype
    np.testing.assert_array_equal(inputs["default"], np.array(values, dtype.as_numpy_dtype))


def test_FloatTensorWithPrecisionLoss():
    """JsontensorTest.FloatTensorWithPrecisionLoss: 1435774380 and 1435774380.0 give the same float."""
    first, _, _ = fill('{"instances": [1435774380]}', {"default": tf.float32})
    second, _, _ = fill('{"instances": [1435774380.0]}', {"default": tf.float32})
    assert first["default"][0] == second["default"][0] == np.float32(1435774380)


def test_FloatTensorThatExceedsMaxReturnsInf_and_ExceedsMinReturnsZero():
    """JsontensorTest.FloatTensorThatExceedsMaxReturnsInf, .FloatTensorThatExceedsMinReturnsZero"""
    for value, want in ((1.7976931348623157e308, np.inf), (-1.7976931348623157e308, -np.inf),
                        (2.2250738585072014e-308, 0.0), (-2.2250738585072014e-308, -0.0)):
        with np.errstate(over="ignore"):
            inputs, _, _ = fill(json.dumps({"instances": [value]}), {"default": tf.float32})
        assert inputs["default"][0] == want and math.copysign(1, inputs["default"][0]) == math.copysign(1, want)


def test_SingleUnnamedTensorWithSignature():
    """JsontensorTest.SingleUnnamedTensorWithSignature"""
    inputs, _, request = fill('{"signature_name": "predict_images", "instances": [[1,2]]}', {"default": tf.int32})
    assert request.model_spec.signature_name == "predict_images"
    np.testing.assert_array_equal(inputs["default"], [[1, 2]])


def test_TensorFromNonNullTerminatedBuffer():
    """JsontensorTest.TensorFromNonNullTerminatedBuffer: what follows the document is ignored."""
    inputs, _, _ = fill('{"instances": [[1,2],[3,4],[5,6]]}X', {"default": tf.int32})
    np.testing.assert_array_equal(inputs["default"], [[1, 2], [3, 4], [5, 6]])


@pytest.mark.parametrize("body, shape", [  # JsontensorTest.SingleUnnamedTensorBase64Scalars, ...Lists, SingleNamed...
    ('{"instances": [ { "b64" : "aGVsbG8=" }, { "b64": "d29ybGQ=" } ]}', (2,)),
    ('{"instances": [ [{ "b64" : "aGVsbG8=" }], [{ "b64": "d29ybGQ=" }] ]}', (2, 1)),
    ('{"instances": [{"default": [ [{ "b64" : "aGVsbG8=" }], [{ "b64": "d29ybGQ=" }] ]}]}', (1, 2, 1)),
])
def test_SingleUnnamedTensorBase64Scalars_Lists_and_SingleNamedTensorBase64(body, shape):
    inputs, _, _ = fill(body, {"default": tf.string})
    assert inputs["default"].shape == shape
    assert inputs["default"].reshape(-1).tolist() == [b"hello", b"world"]


def test_MultipleNamedTensor():
    """JsontensorTest.MultipleNamedTensor: four named inputs of four dtypes, NaN and Infinity accepted."""
    body = """{"instances": [
        {"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"], "float_tensor": [1.0, NaN],
         "dbl_tensor": [NaN]},
        {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"], "float_tensor": [2.0, Infinity],
         "dbl_tensor": [2.0]}]}"""
    types = {"int_tensor": tf.int32, "str_tensor": tf.string, "float_tensor": tf.float32, "dbl_tensor": tf.float64}
    inputs, layout, _ = fill(body, types)
    assert layout == "row" and len(inputs) == 4
    np.testing.assert_array_equal(inputs["int_tensor"], [[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]])
    assert inputs["str_tensor"].tolist() == [[b"foo", b"bar"], [b"baz", b"bat"]]
    np.testing.assert_array_equal(inputs["float_tensor"], np.array([[1.0, np.nan], [2.0, np.inf]], np.float32))
    np.testing.assert_array_equal(inputs["dbl_tensor"], [[np.nan], [2.0]])


def test_SingleUnnamedTensorColumnarFormat():
    """JsontensorTest.SingleUnnamedTensorColumnarFormat: named, and the name left out."""
    for body in ('{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]]}}', '{"inputs": [[[1,2],[3,4],[5,6]]]}'):
        inputs, layout, _ = fill(body, {"int_tensor": tf.int32})
        assert layout == "columnar"
        np.testing.assert_array_equal(inputs["int_tensor"], [[[1, 2], [3, 4], [5, 6]]])


def test_MultipleNamedTensorColumnarFormat():
    """JsontensorTest.MultipleNamedTensorColumnarFormat: a base64 object alone is a scalar."""
    body = '{"inputs": {"int_tensor": [[[1,2],[3,4],[5,6]]], "str_tensor": ["foo", "bar"], ' \
           '"bin_tensor": { "b64" : "aGVsbG8=" }}}'
    inputs, _, _ = fill(body, {"int_tensor": tf.int32, "str_tensor": tf.string, "bin_tensor": tf.string})
    assert inputs["int_tensor"].shape == (1, 3, 2)
    assert inputs["str_tensor"].tolist() == [b"foo", b"bar"]
    assert inputs["bin_tensor"].shape == () and inputs["bin_tensor"].item() == b"hello"


@pytest.mark.parametrize("body, message", [  # JsontensorTest.SingleUnnamedTensorErrors, in its order
    ("", "document is empty"),
    ('{"signature_name": 5, "instances": [[1,2],[3,4],[5,6,7]]}', "must be a string value"),
    ('{"instances": [[1,2],[3,4],[5,6,7]], "inputs": [[1,2],[3,4],[5,6,7]]}', "Not formatted correctly"),
    ('{"instances": [[1,2],[3,4],[5,6,7]]}', "Expecting tensor size"),
    ('{"instances": [[1,2],[3,4],[[5,6]]]}', "Expecting shape"),
    ('{"instances": [1, [1]]}', "Expecting shape"),
    ('{"instances": [[1,2],["a", "b"]]}', "not of expected type"),
])
def test_SingleUnnamedTensorErrors(body, message):
    assert message in fill_error(body, {"default": tf.int32})


@pytest.mark.parametrize("instances, message", [  # JsontensorTest.MultipleNamedTensorErrors, in its order
    ([{"int_tensor": [[1, 2], [3, 4], [5, 6]], "str_tensor": ["foo", "bar"]},
      {"int_tensor": [[[7, 8], [9, 0], [1, 2]]], "str_tensor": ["baz", "bat"]}], "Expecting shape"),
    ([{"int_tensor": [[1, 2], [3, 4], [5, 6], [7, 8]], "str_tensor": ["foo", "bar"]},
      {"int_tensor": [[7, 8], [9, 0], [1, 2]], "str_tensor": ["baz", "bat"]}], "Expecting tensor size"),
    ([{"int_tensor": [[1, 2], [3, 4], [5, 6]], "str_tensor": ["foo", "bar"]}, [1, 20, 30],
      {"int_tensor": [[[7, 8], [9, 0], [1, 2]]], "str_tensor": ["baz", "bat"]}], "Expecting object but got list"),
])
def test_MultipleNamedTensorErrors(instances, message):
    assert message in fill_error(json.dumps({"instances": instances}), {"int_tensor": tf.int32,
                                                                         "str_tensor": tf.string})


def test_MultipleNamedTensorErrors_list_then_object():
    """JsontensorTest.MultipleNamedTensorErrors, its last case: a list first, then an object."""
    body = '{"instances": [["baz", "bar"], {"str_tensor": ["baz", "bat"]}]}'
    assert "Expecting value/list but got object" in fill_error(body, {"str_tensor": tf.string})


# ---- JsontensorTest: PredictResponse -> JSON (MakeJsonFromTensors) ----

def to_json(tensors, layout="row"):
    response = predict_pb2.PredictResponse()
    for name, proto in tensors.items():
        response.outputs[name].CopyFrom(proto)
    return response_json(response, layout)


def to_json_error(tensors):
    with pytest.raises(ServingError) as error:
        to_json(tensors)
    return error.value.message


INT_2_3_2 = np.array([[[1, 2], [3, 4], [5, 6]], [[7, 8], [9, 0], [1, 2]]], np.int32)


def test_FromJsonSingleTensor():
    """JsontensorTest.FromJsonSingleTensor"""
    tensors = {"int_tensor": tf.make_tensor_proto(INT_2_3_2)}
    assert json.loads(to_json(tensors)) == {"predictions": INT_2_3_2.tolist()}
    assert json.loads(to_json(tensors, "columnar")) == {"outputs": INT_2_3_2.tolist()}


def test_FromJsonSingleScalarTensor():
    """JsontensorTest.FromJsonSingleScalarTensor"""
    tensors = {"int_tensor": tf.make_tensor_proto(np.arange(1, 6, dtype=np.int32))}
    assert json.loads(to_json(tensors)) == {"predictions": [1, 2, 3, 4, 5]}
    assert json.loads(to_json(tensors, "columnar")) == {"outputs": [1, 2, 3, 4, 5]}


def test_FromJsonSingleBytesTensor():
    """JsontensorTest.FromJsonSingleBytesTensor: a string output named *_bytes is written as base64."""
    tensors = {"str_tensor_bytes": tf.make_tensor_proto([[b"hello", b"world"], [b"tf", b"serving"]])}
    assert json.loads(to_json(tensors)) == {"predictions": [
        [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}], [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]]}


def number_texts(text):
    return re.findall(r"-?[0-9][0-9.e+-]*|NaN|-?Infinity", text)


def test_FromJsonSingleFloatTensorSixDigitPrecision():
    """JsontensorTest.FromJsonSingleFloatTensorSixDigitPrecision: the numbers as written, compared as text."""
    values = np.array([[9000000, 999999, 0.5], [0.0003, 0.00003, 555557.5]], np.float32)
    text = to_json({"float_tensor": tf.make_tensor_proto(values)})
    assert number_texts(text) == ["9e+06", "999999.0", "0.5", "0.0003", "3e-05", "555557.5"]


def test_FromJsonSingleFloatTensorNonFinite():
    """JsontensorTest.FromJsonSingleFloatTensorNonFinite"""
    values = np.array([[np.nan, np.inf], [3, -np.inf]], np.float32)
    assert number_texts(to_json({"float_tensor": tf.make_tensor_proto(values)})) == [
        "NaN", "Infinity", "3.0", "-Infinity"]


def test_FromJsonSingleTensorErrors():
    """JsontensorTest.FromJsonSingleTensorErrors: no tensors, an unwritable dtype, a scalar in the row format."""
    assert "empty tensor map" in to_json_error({})
    complex_proto = tf.make_tensor_proto(np.array([1 + 2j], np.complex64))
    assert "tensor type: complex64" in to_json_error({"tensor": complex_proto})
    assert "no shape information" in to_json_error({"tensor": tf.make_tensor_proto(np.int32(1))})


def test_FromJsonMultipleNamedTensors():
    """JsontensorTest.FromJsonMultipleNamedTensors: objects per row; columnar keeps the batch dimension."""
    tensors = {
        "int_tensor": tf.make_tensor_proto(INT_2_3_2),
        "str_tensor": tf.make_tensor_proto([[b"foo", b"bar"], [b"baz", b"bat"]]),
        "float_tensor": tf.make_tensor_proto(np.array([[1.0], [2.0]], np.float32)),
        "double_scalar_tensor": tf.make_tensor_proto(np.array([8.0, 9.0], np.float64)),
        "str_tensor_bytes": tf.make_tensor_proto([[b"hello", b"world"], [b"tf", b"serving"]]),
    }
    rows = [{"double_scalar_tensor": 8.0, "float_tensor": [1.0], "int_tensor": INT_2_3_2[0].tolist(),
             "str_tensor": ["foo", "bar"], "str_tensor_bytes": [{"b64": "aGVsbG8="}, {"b64": "d29ybGQ="}]},
            {"double_scalar_tensor": 9.0, "float_tensor": [2.0], "int_tensor": INT_2_3_2[1].tolist(),
             "str_tensor": ["baz", "bat"], "str_tensor_bytes": [{"b64": "dGY="}, {"b64": "c2VydmluZw=="}]}]
    assert json.loads(to_json(tensors)) == {"predictions": rows}
    assert json.loads(to_json(tensors, "columnar")) == {"outputs": {
        name: [row[name] for row in rows] for name in tensors}}


def test_FromJsonMultipleNamedTensorsErrors():
    """JsontensorTest.FromJsonMultipleNamedTensorsErrors"""
    tensors = {"int_tensor": tf.make_tensor_proto(np.zeros((2, 3), np.int32)),
               "str_tensor": tf.make_tensor_proto([[b"foo", b"bar", b"baz"]])}
    assert "inconsistent batch size" in to_json_error(tensors)


def test_FromJsonSingleZeroBatchTensor_and_MultipleZeroBatchTensors():
    """JsontensorTest.FromJsonSingleZeroBatchTensor, .FromJsonMultipleZeroBatchTensors"""
    assert json.loads(to_json({"int_tensor": tf.make_tensor_proto(np.zeros((0, 2), np.int32))})) == {
        "predictions": []}
    assert json.loads(to_json({"str_tensor": tf.make_tensor_proto(np.zeros((0, 1, 2), object), tf.string),
                               "float_tensor": tf.make_tensor_proto(np.zeros((0, 3, 4), np.float32))})) == {
        "predictions": []}


def test_FromJsonMultipleZeroBatchTensorsErrors():
    """JsontensorTest.FromJsonMultipleZeroBatchTensorsErrors"""
    tensors = {"int_tensor": tf.make_tensor_proto(np.zeros((0, 2), np.int32)),
               "str_tensor": tf.make_tensor_proto([[b"foo", b"bar"]])}
    assert "inconsistent batch size" in to_json_error(tensors)


def test_MakeJsonFromStatus_StatusError():
    """MakeJsonFromTensors.StatusError: quotes in the message survive the JSON."""
    for message in ('Bad key: "key"', "Bad key: 'key'"):
        assert json.loads(error_json(message)) == {"error": message}


# ---- ClassifyRegressRequestTest (FillClassificationRequestFromJson, FillRegressionRequestFromJson) ----

METHODS = {"classify": classification_pb2.ClassificationRequest, "regress": regression_pb2.RegressionRequest}


def example(**features):
    proto = example_pb2.Example()
    for name, (kind, values) in features.items():
        getattr(proto.features.feature[name], kind).value.extend(values)
    return proto


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ClassifyRegressRequestTest_RequestNoContext(method):
    body = b"""{"examples": [{"names": ["foo", "bar"], "ratings": [8.0, 9.0], "age": 20},
                            {"names": ["baz"], "ratings": 6.0}]}"""
    request = classify_regress_request(body, model_pb2.ModelSpec(), method)
    want = METHODS[method]()
    want.model_spec.SetInParent()
    want.input.example_list.examples.extend([
        example(names=("bytes_list", [b"foo", b"bar"]), ratings=("float_list", [8, 9]), age=("int64_list", [20])),
        example(names=("bytes_list", [b"baz"]), ratings=("float_list", [6]))])
    assert request == want


@pytest.mark.parametrize("method", sorted(METHODS))
def test_ClassifyRegressRequestTest_RequestWithContextAndSignature(method):
    body = b"""{"signature_name": "custom_signture", "context": {"query": "pizza", "location": ["sfo"]},
                "examples": [{"names": ["foo", "bar"], "ratings": [8.0, 9.0, NaN, Infinity], "age": 20},
                             {"names": ["baz", {"b64": "aGVsbG8="}], "ratings": 6.0, "intboolmix": [1, true, false]},
                             {"names": "bar", "ratings": -Infinity}]}"""
    request = classify_regress_request(body, model_pb2.ModelSpec(), method)
    want = METHODS[method]()
    want.model_spec.signature_name = "custom_signture"
    context = want.input.example_list_with_context
    context.context.CopyFrom(example(query=("bytes_list", [b"pizza"]), location=("bytes_list", [b"sfo"])))
    context.examples.extend([
        example(names=("bytes_list", [b"foo", b"bar"]), ratings=("float_list", [8, 9, math.nan, math.inf]),
                age=("int64_list", [20])),
        example(names=("bytes_list", [b"baz", b"hello"]), ratings=("float_list", [6]),
                intboolmix=("int64_list", [1, 1, 0])),
        example(names=("bytes_list", [b"bar"]), ratings=("float_list", [-math.inf]))])
    assert text_format.MessageToString(request) == text_format.MessageToString(want)  # NaN equal as text


CLASSIFY_REGRESS_JSON_ERRORS = [  # ClassifyRegressRequestTest.JsonErrors, in its order
    ('{"signature_name": ["hello"], "examples": [{"names": ["foo", "bar"]}]}', "'signature_name' key must be a string"),
    ('{"context": [{"names": ["foo", "bar"]}]}', "Example must be JSON object"),
    ('{"examples": {"names": ["foo", "bar"]}}', "list/array"),
    ('{"examples": [[{"names": ["foo", "bar"]}]]}', "Example must be JSON object"),
    ('{"examples": [{"names": [10, null]}]}', "names has element with unexpected JSON type: Null"),
    ('{"examples": [{"names": [10, 10.0]}]}', "feature: names expecting type: int64"),
    ('{"examples": [{"names": [10, {"test": 10}]}]}', "names has element with unexpected JSON type: Object"),
    ('{"examples": [{"names": [[10], 20]}]}', "names has element with unexpected JSON type: Array"),
    ('{"examples": [{"names": [20, 18446744073709551603]}]}', "Only int64_t is supported"),
]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("body, message", CLASSIFY_REGRESS_JSON_ERRORS)
def test_ClassifyRegressRequestTest_JsonErrors(method, body, message):
    with pytest.raises(ServingError) as error:
        classify_regress_request(body.encode(), model_pb2.ModelSpec(), method)
    assert error.value.code == "INVALID_ARGUMENT" and message in error.value.message, error.value.message


# ---- gRPC: Tensor::FromProto reads the first n values (tensor.cc FromProtoField) ----

def test_a_string_tensor_of_shape_1_with_two_values_uses_the_first_over_grpc(rest):
    server, model, _ = rest
    proto = tf.make_tensor_proto([GOOD], tf.string)
    proto.string_val.append(b"not an image, ignored")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = MODEL
    request.model_spec.signature_name = "classify"
    request.inputs["image_bytes"].CopyFrom(proto)
    with grpc.insecure_channel(server.address) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=60)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probability"]), expected(model, [GOOD])[0],
                               atol=TOLERANCE)


def test_rest_answers_are_json_even_for_urllib(rest):
    """Through a client library too (urllib): errors come as {"error": ...} with Content-Type application/json."""
    server, _, _ = rest
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(urllib.request.Request(server.rest_url + "/v1/models/nope"), timeout=60)
    assert error.value.code == 404 and error.value.headers["Content-Type"] == "application/json"
    assert json.loads(error.value.read()) == {"error": "Could not find any versions of model nope"}
