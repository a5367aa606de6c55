"""TF Serving's REST API (`--rest_api_port`) for the local server, on uvicorn and Starlette.

As tensorflow_model_server's HTTP handler does (model_servers/
http_rest_api_handler.cc, util/json_tensor.cc), each call is translated
into the gRPC request proto and answered by the same code as gRPC
(`serving.handlers`), so
codes and messages are the same on both ports:

    GET  /v1/models/NAME[/versions/N | /labels/L]             model status
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata    signature defs
    POST /v1/models/NAME[/versions/N | /labels/L]:predict     {"instances": [...]} or {"inputs": ...}

JSON values are converted to the signature's input dtypes as TF Serving
converts them (`{"b64": "..."}` for bytes); answers are `{"predictions":
[...]}` for the row format and `{"outputs": ...}` for the columnar one,
string outputs whose name ends in `_bytes` as `{"b64": ...}`; errors are
`{"error": "..."}` with TF Serving's HTTP status for the gRPC code.
"""

import asyncio
import base64
import binascii
import json
import logging
import re
import socket
import threading
import time
import urllib.parse

import numpy as np
import tensorflow as tf
import uvicorn
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Route
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    predict_pb2,
    regression_pb2,
)

from patchnet_tf.errors import PatchNetError
from serving import handlers
from serving.errors import ServingError
from serving.loader import DEFAULT_SIGNATURE, _type_name
from serving.metrics import METRICS

LOG = logging.getLogger("patchnet.rest")

# http_rest_api_util.cc
PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.I)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I)
BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
HANDLED_PATH = re.compile(r"/v1/.*", re.I)  # anything else is not the REST API's: plain 404

# http_server.cc ToHTTPStatusCode
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}
MAX_RANK = 64  # numpy's NPY_MAXDIMS: no array (so no input here) has more dimensions
JSON_WRITABLE = {tf.float32, tf.float64, tf.int32, tf.int16, tf.int8, tf.uint8, tf.string, tf.int64, tf.bool,
                 tf.uint32, tf.uint64}  # the dtypes json_tensor.cc writes; others are an error
DEBUG_STRING_LIMIT = 256  # json_tensor.cc kMaxJsonDebugStringBytes
INT_RANGES = {  # the integer JSON values rapidjson's IsInt / IsInt64 / IsUint / IsUint64 accept
    tf.int32: (-2**31, 2**31 - 1), tf.int16: (-2**31, 2**31 - 1), tf.int8: (-2**31, 2**31 - 1),
    tf.uint8: (-2**31, 2**31 - 1), tf.int64: (-2**63, 2**63 - 1), tf.uint32: (0, 2**32 - 1),
    tf.uint64: (0, 2**64 - 1),
}


def invalid(message):
    return ServingError("INVALID_ARGUMENT", message)


# ---- JSON request -> PredictRequest (json_tensor.cc FillPredictRequestFromJson) ----

def _json_type(value):
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def debug_string(value, limit=DEBUG_STRING_LIMIT):
    """JsonValueToDebugString: rapidjson's pretty writer with one-line arrays, cut off after `limit` bytes."""
    pieces, size = [], 0

    class Full(Exception):
        pass

    def emit(text):
        nonlocal size
        if size >= limit:  # as JsonWriterWithLimit: whole tokens until the limit is passed
            raise Full
        pieces.append(text)
        size += len(text)

    def write(item, indent, prefix):
        if isinstance(item, dict):
            emit(prefix + "{")
            for index, (key, member) in enumerate(item.items()):
                emit(("," if index else "") + "\n" + "    " * (indent + 1) + json.dumps(key, ensure_ascii=False))
                write(member, indent + 1, ": ")
            emit(("\n" + "    " * indent if item else "") + "}")
        elif isinstance(item, list):
            emit(prefix + "[")
            for index, member in enumerate(item):
                write(member, indent, ", " if index else "")
            emit("]")
        else:
            emit(prefix + json.dumps(item, ensure_ascii=False))

    try:
        write(value, 0, "")
    except Full:
        pass
    return "".join(pieces)


def _format_error(value, *parts):
    return invalid(f"JSON Value: {debug_string(value)} {''.join(parts)}")


def _is_base64_object(value):
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _b64decode(value):
    if not _is_base64_object(value):
        raise invalid(f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
    text = value["b64"]
    try:  # absl::Base64Unescape: standard alphabet, padding optional
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid("Unable to base64 decode") from None


def _type_error(value, dtype):
    return invalid(f"JSON Value: {debug_string(value)} Type: {_json_type(value)} "
                   f"is not of expected type: {_type_name(dtype)}")


def _convert_value(value, dtype):
    """AddValueToTensor: one JSON scalar as the signature's dtype."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if dtype in (tf.float32, tf.float64):
        if not is_number:
            raise _type_error(value, dtype)
        return float(value)
    if dtype in INT_RANGES:
        low, high = INT_RANGES[dtype]
        if not (is_number and isinstance(value, int) and low <= value <= high):
            raise _type_error(value, dtype)
        return value
    if dtype == tf.string:
        if not isinstance(value, str):
            raise _type_error(value, dtype)
        return value.encode("utf-8", "surrogatepass")
    if dtype == tf.bool:
        if not isinstance(value, bool):
            raise _type_error(value, dtype)
        return value
    raise ServingError("UNIMPLEMENTED", f"Conversion of JSON Value: {debug_string(value)} "
                                          f"to type: {_type_name(dtype)}")


def _dense_shape(value, name):
    """GetDenseTensorShape: the sizes of the first element at each nesting level. More levels than an
    array can have get TF Serving's answer to a tensor it cannot build."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    if len(shape) >= MAX_RANK:  # the batch dimension comes on top in the row format
        raise invalid(f"tensor parsing error: {name}: lists nested {len(shape)} deep (at most {MAX_RANK - 1})")
    return shape


def _fill(value, level, dtype, shape, values):
    """FillTensorProto: appends the leaves of `value` to `values`, checking it is dense with `shape`."""
    rank = len(shape)
    if not isinstance(value, list):
        if level != rank:
            raise invalid(f"JSON Value: {debug_string(value)} found at incorrect level: {level + 1} "
                          f"in the JSON DOM. Expected at level: {rank}")
        if isinstance(value, dict):
            if dtype != tf.string:
                raise _type_error(value, dtype)
            values.append(_b64decode(value))
        else:
            values.append(_convert_value(value, dtype))
        return
    if level >= rank:
        raise invalid(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(value) != shape[level]:
        raise invalid(f"Encountered list at unexpected size: {len(value)} at level: {level} "
                      f"expected size: {shape[level]}")
    for member in value:
        _fill(member, level + 1, dtype, shape, values)


def _tensor_proto(values, shape, dtype):
    if dtype == tf.string:
        array = np.empty(len(values), dtype=object)
        array[:] = values
    else:
        array = np.array(values, dtype=dtype.as_numpy_dtype)
    return tf.make_tensor_proto(array.reshape(shape), dtype=dtype)


def _status_text(error):
    return f"{error.code}: {error.message}"  # absl::Status::ToString()


def _inputs_from_instances(instances, infos):
    """FillTensorMapFromInstancesList (the row format)."""
    first = instances[0]
    if not isinstance(first, dict) and len(infos) > 1:
        raise invalid("instances is a plain list, but expecting list of objects as multiple input tensors "
                      "required as per tensorinfo_map")

    def is_element_object(value):
        return isinstance(value, dict) and not _is_base64_object(value)

    objects = is_element_object(first)
    values, shapes = {}, {}

    def add(item, name):
        if name not in infos:
            raise invalid(f"JSON object: does not have named input: {name}")
        shape = _dense_shape(item, name)
        collected = []
        _fill(item, 0, infos[name], shape, collected)
        if name not in shapes:
            shapes[name] = shape
        else:
            size = int(np.prod(shapes[name]))
            if size != len(collected):
                raise invalid(f"Expecting tensor size: {size} but got: {len(collected)}")
            if shapes[name] != shape:
                raise invalid(f"Expecting shape [{','.join(map(str, shapes[name]))}] "
                              f"but got: [{','.join(map(str, shape))}]")
        values.setdefault(name, []).extend(collected)

    for index, element in enumerate(instances):
        if objects:
            if not is_element_object(element):
                raise invalid(f"Expecting object but got list at item {index} of input list")
            for name, item in element.items():
                try:
                    add(item, name)
                except ServingError as error:
                    raise invalid(f"Failed to process element: {index} key: {name} of 'instances' list. "
                                  f"Error: {_status_text(error)}") from None
            if set(element) != set(infos):
                raise invalid(f"Failed to process element: {index} of 'instances' list. JSON object: "
                              f"{debug_string(element)} keys must be equal to: {','.join(sorted(infos))}")
        else:
            if is_element_object(element):
                raise invalid(f"Expecting value/list but got object at item {index} of input list")
            name = next(iter(infos))
            try:
                add(element, name)
            except ServingError as error:
                raise invalid(f"Failed to process element: {index} of 'instances' list. "
                              f"Error: {_status_text(error)}") from None
    return {name: _tensor_proto(values[name], [len(instances), *shapes[name]], infos[name]) for name in values}


def _inputs_from_columns(columns, infos):
    """FillTensorMapFromInputsMap (the columnar format)."""
    if not isinstance(columns, dict) or _is_base64_object(columns):
        if len(infos) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple input tensors "
                          "required as per tensorinfo_map")
        columns = {next(iter(infos)): columns}
    tensors = {}
    for name, dtype in infos.items():
        if name not in columns:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        shape = _dense_shape(columns[name], name)
        collected = []
        _fill(columns[name], 0, dtype, shape, collected)
        tensors[name] = _tensor_proto(collected, shape, dtype)
    return tensors


def parse_json(body):
    """ParseJson: the request document, which must be an object (trailing data is ignored, as rapidjson's
    kParseStopWhenDoneFlag does; NaN and Infinity are accepted; any depth, as its kParseIterativeFlag)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:  # rapidjson's words for it
        raise invalid(f"JSON Parse error: Invalid encoding in string. at offset: {error.start}") from None
    if not text.strip():
        raise invalid("JSON Parse error: The document is empty")
    start = len(text) - len(text.lstrip())
    try:
        try:
            document, _ = json.JSONDecoder().raw_decode(text, start)
        except RecursionError:  # nested deeper than Python's recursion limit: parse it without recursion
            document = _parse_nested(text, start)
        except json.JSONDecodeError:  # parse again for rapidjson's words of the error
            document = _parse_nested(text, start)
    except json.JSONDecodeError as error:
        raise invalid(f"JSON Parse error: {error.msg} at offset: {error.pos}") from None
    if not isinstance(document, dict):
        raise _format_error(document, "Is not object")
    return document


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?")
_LITERALS = {"true": True, "false": False, "null": None, "NaN": float("nan"), "Infinity": float("inf"),
             "-Infinity": float("-inf")}


# Python's json messages for bad strings, in rapidjson's words (rapidjson/error/en.h)
_STRING_ERRORS = {"Unterminated string": "Missing a closing quotation mark in string.",
                  "Invalid control character": "Invalid encoding in string.",
                  "Invalid \\uXXXX escape": "Incorrect hex digit after \\u escape in string.",
                  "Invalid \\escape": "Invalid escape character in string."}


def _scan_string(text, pos):
    """json's string scanner at the character after the opening quote; errors in rapidjson's words."""
    try:
        return json.decoder.scanstring(text, pos)
    except json.JSONDecodeError as error:
        message = next((words for prefix, words in _STRING_ERRORS.items() if error.msg.startswith(prefix)),
                       error.msg)
        raise json.JSONDecodeError(message, text, error.pos) from None


def _parse_nested(text, pos):
    """The JSON value at `pos`, as json.JSONDecoder.raw_decode gives it, parsed with an explicit stack
    instead of recursion, so that any depth parses (TF Serving's tests send 500,000 levels). Errors
    carry rapidjson's words, as TF Serving's messages do."""
    open_containers = []  # [container, key of the member being parsed (objects)]

    def skip(at):
        return _WHITESPACE.match(text, at).end()

    def key(at):
        at = skip(at)
        if text[at:at + 1] != '"':
            raise json.JSONDecodeError("Missing a name for object member.", text, at)
        name, at = _scan_string(text, at + 1)
        at = skip(at)
        if text[at:at + 1] != ":":
            raise json.JSONDecodeError("Missing a colon after a name of object member.", text, at)
        return name, at + 1

    while True:
        pos = skip(pos)
        char = text[pos:pos + 1]
        if char in ("{", "["):
            container, closing = ({}, "}") if char == "{" else ([], "]")
            pos = skip(pos + 1)
            if text[pos:pos + 1] != closing:
                open_containers.append([container, None])
                if char == "{":
                    open_containers[-1][1], pos = key(pos)
                continue
            value, pos = container, pos + 1
        elif char == '"':
            value, pos = _scan_string(text, pos + 1)
        else:
            literal = next((word for word in _LITERALS if text.startswith(word, pos)), None)
            number = _NUMBER.match(text, pos)
            if literal is not None:
                value, pos = _LITERALS[literal], pos + len(literal)
            elif number:
                value = float(number.group()) if number.group(1) or number.group(2) else int(number.group())
                pos = number.end()
            else:
                raise json.JSONDecodeError("Invalid value.", text, pos)
        while True:  # put the value in its container; close the containers that end here
            if not open_containers:
                return value
            container, name = open_containers[-1]
            if isinstance(container, dict):
                container[name] = value
            else:
                container.append(value)
            pos = skip(pos)
            char = text[pos:pos + 1]
            if char == ",":
                if isinstance(container, dict):
                    open_containers[-1][1], pos = key(pos + 1)
                else:
                    pos += 1
                break
            if isinstance(container, dict) and char != "}":
                raise json.JSONDecodeError("Missing a comma or '}' after an object member.", text, pos)
            if isinstance(container, list) and char != "]":
                raise json.JSONDecodeError("Missing a comma or ']' after an array element.", text, pos)
            value, pos = container, pos + 1
            open_containers.pop()


def _fill_signature(document, model_spec):
    """FillSignature: the optional "signature_name" into the ModelSpec."""
    if "signature_name" not in document:
        return
    if not isinstance(document["signature_name"], str):
        raise invalid(f"JSON Value: {debug_string(document)} not formatted correctly. "
                      "'signature_name' key must be a string value.")
    try:
        model_spec.signature_name = document["signature_name"]
    except (UnicodeEncodeError, ValueError):  # a lone \\ud800 escape: no UTF-8 string (rapidjson's words)
        raise invalid("JSON Parse error: The surrogate pair in string is invalid.") from None


def predict_request(body, model_spec, input_types):
    """FillPredictRequestFromJson: (PredictRequest, "row" or "columnar"). `input_types(model_spec)` gives the
    signature's {input name: tf.DType} (TF Serving's GetInfoMap callback): they decide how values convert."""
    document = parse_json(body)
    request = predict_pb2.PredictRequest()
    request.model_spec.CopyFrom(model_spec)
    _fill_signature(document, request.model_spec)
    infos = input_types(request.model_spec)
    if not infos:
        raise invalid(f"Failed to get input map for signature: {request.model_spec.signature_name or 'DEFAULT'}")
    has_instances, has_inputs = "instances" in document, "inputs" in document
    if has_instances and has_inputs:
        raise _format_error(document, "Not formatted correctly expecting only one of 'inputs' or 'instances' "
                                      "keys to exist ")
    if has_instances:
        instances = document["instances"]
        if not isinstance(instances, list):
            raise _format_error(document, "Expecting 'instances' to be an list/array")
        if not instances:
            raise _format_error(document, "No values in 'instances' array")
        tensors, layout = _inputs_from_instances(instances, infos), "row"
    elif has_inputs:
        tensors, layout = _inputs_from_columns(document["inputs"], infos), "columnar"
    else:
        raise invalid("Missing 'inputs' or 'instances' key")
    for name, proto in tensors.items():
        request.inputs[name].CopyFrom(proto)
    return request, layout


def input_types(core, model_spec):
    """GetInfoMap: the input dtypes of the signature a request names."""
    _, model = core.get(model_spec)
    signature_name = model_spec.signature_name or DEFAULT_SIGNATURE
    signature = model.signatures.get(signature_name)
    if signature is None:  # INVALID_ARGUMENT here, where gRPC says FAILED_PRECONDITION: TF Serving's REST does
        raise invalid(f'Serving signature name: "{signature_name}" not found in signature def')
    return {name: tf.dtypes.as_dtype(info.dtype) for name, info in sorted(signature.inputs.items())}


# ---- JSON request -> ClassificationRequest / RegressionRequest (FillClassifyRegressRequestFromJson) ----

def classify_regress_request(body, model_spec, method):
    """A ClassificationRequest (`method` "classify") or RegressionRequest ("regress") of tf.Examples."""
    document = parse_json(body)
    request = (classification_pb2.ClassificationRequest if method == "classify"
               else regression_pb2.RegressionRequest)()
    request.model_spec.CopyFrom(model_spec)
    _fill_signature(document, request.model_spec)
    with_context = "context" in document
    if with_context:
        _fill_example(document["context"], request.input.example_list_with_context.context)
    if "examples" not in document:  # TF Serving says "classify" for :regress too
        raise _format_error(document, "When method is classify, key 'examples' is expected and was not found")
    examples = document["examples"]
    if not isinstance(examples, list):
        raise _format_error(document, "Expecting 'examples' value to be an list/array")
    if not examples:
        raise _format_error(document, "'examples' value is an empty array")
    target = (request.input.example_list_with_context.examples if with_context
              else request.input.example_list.examples)
    for value in examples:
        _fill_example(value, target.add())
    return request


def _fill_example(value, example):
    """MakeExampleFromJsonObject: {"feature": value or [values]} -> tf.train.Example."""
    if not isinstance(value, dict):
        raise invalid(f"Example must be JSON object but got JSON {_json_type(value)}")
    for name, content in value.items():
        feature = example.features.feature[name]
        for item in content if isinstance(content, list) else [content]:
            _add_feature_value(item, name, feature)


FEATURE_KINDS = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}


def _add_feature_value(value, name, feature):
    """AddValueToFeature: a feature takes the kind of its first value; the others must be of that kind."""
    unexpected = invalid(f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")
    if value is None or isinstance(value, list) or (isinstance(value, dict) and not _is_base64_object(value)):
        raise unexpected
    if isinstance(value, (bool, int)):
        kind = "int64_list"
        if not isinstance(value, bool) and not -2**63 <= value < 2**63:
            if 0 <= value < 2**64:
                raise invalid(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
            kind = "float_list"  # rapidjson reads an integer beyond 64 bits as a double
    elif isinstance(value, float):
        kind = "float_list"
    else:
        kind = "bytes_list"
    current = feature.WhichOneof("kind")
    if current not in (None, kind):
        raise invalid(f"Unexpected element type in feature: {name} expecting type: {FEATURE_KINDS[current]}")
    values = getattr(feature, kind).value
    if kind == "bytes_list":
        values.append(_b64decode(value) if isinstance(value, dict) else value.encode("utf-8"))
    else:
        values.append(int(value) if kind == "int64_list" else float(value))


# ---- PredictResponse -> JSON (json_tensor.cc MakeJsonFromTensors) ----

def _float_texts(array):
    """WriteDecimal: six significant digits when they round-trip, else max_digits10; whole numbers get '.0'."""
    flat = array.reshape(-1)
    digits = 9 if array.dtype == np.float32 else 17
    texts = []
    for value in flat.tolist():
        if value != value:
            texts.append("NaN")
            continue
        if value in (float("inf"), float("-inf")):
            texts.append("Infinity" if value > 0 else "-Infinity")
            continue
        text = "%g" % value
        if array.dtype.type(float(text)) != array.dtype.type(value):
            text = "%.*g" % (digits, value)
        if "." not in text and "e" not in text:
            text += ".0"
        texts.append(text)
    return np.array(texts, dtype=object).reshape(array.shape)


def _value_texts(name, array, dtype):
    """Each element of `array` as JSON text, the way TF Serving writes that dtype (AddSingleValueAndAdvance)."""
    if dtype not in JSON_WRITABLE:
        raise invalid(f"Failed to write JSON value for tensor type: {_type_name(dtype)}")
    if array.dtype.kind == "f":
        return _float_texts(array)
    if array.dtype == object or array.dtype.kind in "SU":
        as_bytes = name.endswith("_bytes")  # IsNamedTensorBytes

        def text(value):
            value = value if isinstance(value, bytes) else str(value).encode()
            if as_bytes:
                return '{"b64": "%s"}' % base64.b64encode(value).decode()
            return json.dumps(value.decode("utf-8", "replace"), ensure_ascii=False)

        return np.vectorize(text, otypes=[object])(array) if array.size else array.astype(object)
    if array.dtype == bool:
        return np.where(array, "true", "false").astype(object)
    return np.vectorize(str, otypes=[object])(array) if array.size else array.astype(object)


def _nested(texts):
    if isinstance(texts, str):
        return texts
    if texts.ndim == 0:
        return texts.item()
    if texts.ndim == 1:
        return "[" + ", ".join(texts.tolist()) + "]"
    return "[" + ", ".join(_nested(part) for part in texts) + "]"


def response_json(response, layout):
    """{"predictions": [...]} (row) or {"outputs": ...} (columnar) from a PredictResponse."""
    if not response.outputs:
        raise invalid("Cannot convert empty tensor map to JSON")
    texts = {name: _value_texts(name, tf.make_ndarray(proto), tf.dtypes.as_dtype(proto.dtype))
             for name, proto in sorted(response.outputs.items())}
    if layout == "columnar":
        if len(texts) == 1:
            return '{\n    "outputs": %s\n}' % _nested(next(iter(texts.values())))
        members = ",\n".join(f'        {json.dumps(name)}: {_nested(value)}' for name, value in texts.items())
        return '{\n    "outputs": {\n%s\n    }\n}' % members
    batch = None
    for name, value in texts.items():
        if value.ndim == 0:
            raise invalid(f"Tensor name: {name} has no shape information ")
        if batch is not None and value.shape[0] != batch:
            raise invalid(f"Tensor name: {name} has inconsistent batch size: {value.shape[0]} expecting: {batch}")
        batch = value.shape[0]
    rows = []
    for index in range(batch):
        if len(texts) == 1:
            rows.append("        " + _nested(next(iter(texts.values()))[index]))
        else:
            members = ", ".join(f"{json.dumps(name)}: {_nested(value[index])}" for name, value in texts.items())
            rows.append("        {" + members + "}")
    return '{\n    "predictions": [\n%s\n    ]\n}' % ",\n".join(rows)


def error_json(message):
    return json.dumps({"error": message}, indent=4, ensure_ascii=False)


# ---- routing (http_rest_api_handler.cc ProcessRequest) ----

def _model_spec(name, version, label):
    """FillModelSpecWithNameVersionAndLabel, after ParseModelInfo's decoding."""
    spec = model_pb2.ModelSpec()
    if BAD_ESCAPE.search(name or ""):  # libevent refuses such a URL with 400 before TF Serving sees it
        raise invalid(f"Failed to decode model name:{name}")
    if BAD_ESCAPE.search(label or ""):
        raise invalid(f"Failed to decode model version label:{label}")
    spec.name = urllib.parse.unquote(name or "")
    if version:
        number = int(version)
        if number >= 2**63:
            raise invalid(f"Failed to convert version: {version} to numeric.")
        spec.version.value = number
    if label:
        spec.version_label = urllib.parse.unquote(label)
    return spec


def handle(core, method, path, body, run=None):
    """(HTTP status, JSON text) for one REST call, counted and timed as http_server.cc does."""
    start = time.perf_counter()
    code = "OK"
    try:
        return 200, _dispatch(core, method, path, body, run)
    except ServingError as error:
        code = error.code
        return HTTP_STATUS.get(error.code, 500), error_json(error.message)
    except Exception as error:  # a bug must cost one request an INTERNAL answer, never the connection
        code = "INTERNAL"
        LOG.exception("REST %s %s failed", method, path)
        return 500, error_json(f"{type(error).__name__}: {error}")
    finally:
        model_name, api = _metric_labels(method, path)
        METRICS.request(model_name, api, "REST", code, time.perf_counter() - start)


def _metric_labels(method, path):
    """(model name, method) as ParseModelInfo fills them: empty unless the path matched; the method (":predict")
    only for POST."""
    pattern = {"POST": PREDICT_PATH, "GET": STATUS_PATH}.get(method)
    match = pattern.fullmatch(path) if pattern else None
    if not match:
        return "", ""
    return urllib.parse.unquote(match.group(1) or ""), match.group(4) if method == "POST" else ""


def _dispatch(core, method, path, body, run):
    malformed = invalid(f"Malformed request: {method} {path}")
    if method == "POST":
        match = PREDICT_PATH.fullmatch(path)
        if not match:
            raise malformed
        name, version, label, verb = match.groups()
        spec = _model_spec(name, version, label)
        if verb == "predict":
            request, layout = predict_request(body, spec, lambda model_spec: input_types(core, model_spec))
            return response_json(handlers.predict(core, request, run), layout)
        if verb == "classify":  # case-sensitive, as in TF Serving: ":Classify" matches the path, then nothing
            return handlers.classify(core, classify_regress_request(body, spec, verb))
        if verb == "regress":
            return handlers.regress(core, classify_regress_request(body, spec, verb))
        raise malformed
    if method == "GET":
        match = STATUS_PATH.fullmatch(path)
        if not match:
            raise malformed
        name, version, label, subresource = match.groups()
        spec = _model_spec(name, version, label)
        if not spec.name:
            raise invalid("Missing model name in request.")
        if subresource == "metadata":  # the path is case-insensitive, this comparison is not (as in TF Serving)
            request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            request.model_spec.CopyFrom(spec)
            return _metadata_json(handlers.get_model_metadata(core, request))
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.CopyFrom(spec)
        return json_format.MessageToJson(handlers.get_model_status(core, request),
                                         always_print_fields_with_no_presence=True, indent=1)
    raise malformed


def _metadata_json(response):
    """As TF Serving's ToJsonString(GetModelMetadataResponse): proto field names, the Any unpacked."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)

    def as_json(message):
        return json_format.MessageToJson(message, always_print_fields_with_no_presence=True,
                                         preserving_proto_field_name=True, indent=1)

    return f'{{\n"model_spec":{as_json(response.model_spec)},\n"metadata": {{"signature_def": ' \
           f'{as_json(signature_map)}}}\n}}\n'


class RestServer:
    """The REST front end of a local server on uvicorn (HTTP/1.1: parsing, chunking, keep-alive) with a
    Starlette app, the stack KServe's Python model server uses: `.port`, `.start()`, `.stop()`. uvicorn
    runs with its C parser (httptools) and event loop (uvloop): `python -m bench.rest_servers` measured
    them at about twice the throughput of its pure-Python h11 and asyncio.

    The body is refused before it is read when its Content-Length (or, chunked, the bytes received so
    far) exceeds `max_body_bytes`, the same cap as gRPC's --max-message-bytes, with gRPC's message.
    """

    def __init__(self, core, host, port, run=None, max_body_bytes=2**31 - 1, metrics_path=None):
        self.core = core
        self.run = run
        self.metrics_path = metrics_path  # answered with Prometheus text (serving.metrics), as TF Serving's
        self.max_body_bytes = max_body_bytes
        self.body_idle_seconds = BODY_IDLE_SECONDS
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it
        # a response written as headers then body waits 40 ms for the client's delayed ACK.
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:  # bound now, before any model loads, like the gRPC port
            self._socket.bind((host.strip("[]"), port))
        except OSError as error:
            self._socket.close()
            raise PatchNetError(f"cannot bind {host}:{port} for the REST API ({error.strerror})") from None
        self.port = self._socket.getsockname()[1]
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=HTTP_METHODS)])
        # Keep-alive connections idle longer than a minute are closed; TF Serving's libevent server has no
        # such timeout, but an idle client pool reconnects transparently.
        config = uvicorn.Config(app, http="httptools", loop="uvloop", lifespan="off", access_log=False,
                                log_level="warning", timeout_keep_alive=60, backlog=1024, timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = None

    async def _endpoint(self, request):
        path = request.scope["raw_path"].decode("latin-1")  # TF Serving matches the undecoded path
        if path == self.metrics_path:  # http_server.cc ProcessPrometheusRequest: any method, no body read
            return Response(METRICS.text(), 200, media_type="text/plain")
        if not HANDLED_PATH.fullmatch(path):
            return Response("Not Found", 404, media_type="text/plain")
        try:
            body = await read_body(request, self.max_body_bytes, self.body_idle_seconds)
        except ServingError as error:  # the rest of the body is not read: close the connection after the answer
            response = error_response(error.code, error.message)
            response.headers["connection"] = "close"
            return response
        except ClientDisconnect:  # a bad chunk: uvicorn has answered 400 and closed the connection
            return Response(status_code=400)
        if request.method == "OPTIONS":  # CORS preflight, as http_server.cc answers it
            if re.search(r"https?://", request.headers.get("origin", "")):
                return Response("", 200, media_type="application/json")
            return error_response("FAILED_PRECONDITION", "Origin header is missing in CORS preflight")
        status, text = await run_in_threadpool(handle, self.core, request.method, path, body, self.run)
        return Response(text, status, media_type="application/json")

    def start(self):
        self._socket.listen(1024)  # connections wait in the backlog until uvicorn's loop accepts them
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, name="rest",
                                        daemon=True)
        self._thread.start()

    def stop(self, grace=5.0):
        """Stops accepting, waits up to `grace` seconds for calls in flight, closes the socket."""
        if self._thread is not None:
            self._server.config.timeout_graceful_shutdown = grace  # read by uvicorn when it shuts down
            self._server.should_exit = True
            self._thread.join(grace + 5)
        self._socket.close()


BODY_IDLE_SECONDS = 30.0
HTTP_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]


def error_response(code, message):
    """`{"error": message}` with the HTTP status TF Serving gives the gRPC code; before the handler, 413 for
    a body over the cap and 408 for one that stopped arriving."""
    status = {"RESOURCE_EXHAUSTED": 413, "DEADLINE_EXCEEDED": 408}.get(code) or HTTP_STATUS.get(code, 500)
    return Response(error_json(message), status, media_type="application/json")


async def read_body(request, limit, idle_seconds):
    """The request body, refused with gRPC's RESOURCE_EXHAUSTED message before it is read when its
    Content-Length is over `limit`, or as soon as more than `limit` bytes of a chunked body arrived; a body
    that stops arriving for `idle_seconds` (a chunk announced and never sent) is refused too."""
    length = request.headers.get("content-length")
    if length is not None and int(length) > limit:  # uvicorn has refused a Content-Length that is no number
        raise ServingError("RESOURCE_EXHAUSTED", too_large(int(length), limit))
    chunks, size = [], 0
    stream = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(anext(stream), idle_seconds)
        except StopAsyncIteration:
            return b"".join(chunks)
        except TimeoutError:
            raise ServingError("DEADLINE_EXCEEDED", f"no request body bytes arrived for {idle_seconds:g} s; "
                                                    f"{size} of the body received") from None
        size += len(chunk)
        if size > limit:
            raise ServingError("RESOURCE_EXHAUSTED", too_large(size, limit))
        chunks.append(chunk)


def too_large(size, limit):
    return f"SERVER: Received message larger than max ({size} vs. {limit})"  # gRPC core's words for the same cap
