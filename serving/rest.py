"""TF Serving's REST API (`--rest_api_port`) for the local server, on the standard library's HTTP server.

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

import base64
import binascii
import http.server
import json
import logging
import re
import threading
import urllib.parse

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from patchnet_tf.errors import PatchNetError
from serving import handlers
from serving.errors import ServingError
from serving.loader import DEFAULT_SIGNATURE, _type_name

LOG = logging.getLogger("patchnet.rest")

# http_rest_api_util.cc
PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.I)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I)
HANDLED_PATH = re.compile(r"/v1/.*", re.I)  # anything else is not the REST API's: plain 404

# http_server.cc ToHTTPStatusCode
HTTP_STATUS = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}
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


def _dense_shape(value):
    """GetDenseTensorShape: the sizes of the first element at each nesting level."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
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
        shape = _dense_shape(item)
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
        shape = _dense_shape(columns[name])
        collected = []
        _fill(columns[name], 0, dtype, shape, collected)
        tensors[name] = _tensor_proto(collected, shape, dtype)
    return tensors


def parse_json(body):
    """ParseJson: the request document, which must be an object (trailing data is ignored, as rapidjson's
    kParseStopWhenDoneFlag does; NaN and Infinity are accepted)."""
    text = body.decode("utf-8", "surrogateescape")
    if not text.strip():
        raise invalid("JSON Parse error: The document is empty")
    try:
        document, _ = json.JSONDecoder().raw_decode(text, len(text) - len(text.lstrip()))
    except json.JSONDecodeError as error:
        raise invalid(f"JSON Parse error: {error.msg} at offset: {error.pos}") from None
    if not isinstance(document, dict):
        raise _format_error(document, "Is not object")
    return document


def predict_request(core, model_spec, body):
    """FillPredictRequestFromJson: (PredictRequest, "row" or "columnar")."""
    document = parse_json(body)
    request = predict_pb2.PredictRequest()
    request.model_spec.CopyFrom(model_spec)
    if "signature_name" in document:
        if not isinstance(document["signature_name"], str):
            raise invalid(f"JSON Value: {debug_string(document)} not formatted correctly. "
                          "'signature_name' key must be a string value.")
        request.model_spec.signature_name = document["signature_name"]
    # GetInfoMap: the signature's input dtypes decide how JSON values convert.
    _, model = core.get(request.model_spec)
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = model.signatures.get(signature_name)
    if signature is None:  # INVALID_ARGUMENT here, where gRPC says FAILED_PRECONDITION: TF Serving's REST does
        raise invalid(f'Serving signature name: "{signature_name}" not found in signature def')
    infos = {name: tf.dtypes.as_dtype(info.dtype) for name, info in sorted(signature.inputs.items())}
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


def _value_texts(name, array):
    """Each element of `array` as JSON text, the way TF Serving writes that dtype."""
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
    arrays = {name: tf.make_ndarray(proto) for name, proto in sorted(response.outputs.items())}
    if not arrays:
        raise invalid("Cannot convert empty tensor map to JSON")
    texts = {name: _value_texts(name, array) for name, array in arrays.items()}
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
    """(HTTP status, JSON text) for one REST call."""
    try:
        return 200, _dispatch(core, method, path, body, run)
    except ServingError as error:
        return HTTP_STATUS.get(error.code, 500), error_json(error.message)
    except Exception as error:  # a bug must cost one request an INTERNAL answer, never the connection
        LOG.exception("REST %s %s failed", method, path)
        return 500, error_json(f"{type(error).__name__}: {error}")


def _dispatch(core, method, path, body, run):
    malformed = invalid(f"Malformed request: {method} {path}")
    if method == "POST":
        match = PREDICT_PATH.fullmatch(path)
        if not match:
            raise malformed
        name, version, label, verb = match.groups()
        spec = _model_spec(name, version, label)
        if verb == "predict":
            request, layout = predict_request(core, spec, body)
            return response_json(handlers.predict(core, request, run), layout)
        if verb in ("classify", "regress"):
            raise ServingError("UNIMPLEMENTED", f":{verb} needs a {verb} signature; PatchNet's signatures "
                                                  "are predict signatures (use :predict)")
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


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as TF Serving's libevent server
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall
    server_version = "patchnet-serve"

    def _answer(self):
        rest = self.server.rest
        with rest.in_flight:
            rest.requests += 1
        try:
            path = urllib.parse.urlsplit(self.path).path
            body = self._body()
            if body is None:
                return
            if not HANDLED_PATH.fullmatch(path):
                self._send(404, "Not Found", "text/plain")
                return
            if self.command == "OPTIONS":  # CORS preflight, as http_server.cc answers it
                if re.search(r"https?://", self.headers.get("Origin", "")):
                    self._send(200, "")
                else:
                    self._send(400, error_json("Origin header is missing in CORS preflight"))
                return
            status, text = handle(rest.core, self.command, path, body, rest.run)
            self._send(status, text)
        finally:
            with rest.in_flight:
                rest.requests -= 1
                rest.in_flight.notify_all()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _answer

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._send(400, error_json("Content-Length is not a number"))
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status, text, content_type="application/json"):
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        LOG.debug("%s %s", self.address_string(), format % args)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up a stop
    request_queue_size = 1024  # socketserver's 5 resets connections when many clients connect at once


class RestServer:
    """The REST front end of a local server: `.port`, `.start()`, `.stop()`."""

    def __init__(self, core, host, port, run=None):
        self.core = core
        self.run = run
        self.in_flight = threading.Condition()
        self.requests = 0
        try:  # bound now, before any model loads, like the gRPC port
            self._server = _HTTPServer((host, port), _Handler)
        except OSError as error:
            raise PatchNetError(f"cannot bind {host}:{port} for the REST API ({error.strerror})") from None
        self._server.rest = self
        self.port = self._server.server_address[1]
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, name="rest", daemon=True)
        self._thread.start()

    def stop(self, grace=5.0):
        """Stops accepting, waits up to `grace` seconds for calls in flight, closes the socket."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
        with self.in_flight:
            self.in_flight.wait_for(lambda: self.requests == 0, timeout=grace)
        self._server.server_close()
