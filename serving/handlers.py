"""The answers of TF Serving's APIs, called by both front ends (gRPC in `serving.server`, REST in
`serving.rest`), so that their codes and messages are one: Predict, Classify, Regress,
GetModelMetadata, GetModelStatus. Each takes the request proto and returns the response proto, or
raises ServingError with TF Serving's status code and message.
"""

import copy
import math

import grpc
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from serving.core import status_name
from serving.errors import ServingError
from serving.loader import DEFAULT_SIGNATURE, first_line
from serving.memory import returns_memory

CLASSIFY_INPUTS = "inputs"  # tensorflow/cc/saved_model/signature_constants.h: kClassifyInputs = kRegressInputs
CLASSIFY_OUTPUTS = ("classes", "scores")  # kClassifyOutputClasses, kClassifyOutputScores
REGRESS_OUTPUTS = "outputs"  # kRegressOutputs
VALUE_FIELDS = ("string_val", "float_val", "double_val", "int_val", "int64_val", "bool_val", "half_val", "uint32_val",
                "uint64_val")  # TensorProto's one-value-per-element fields


def tensor_from_proto(proto):
    """The array of a TensorProto as TF's Tensor::FromProto reads it: values beyond the shape's element
    count are ignored (tensor.cc FromProtoField copies the first n), so a string tensor of shape [1]
    carrying two values is its first; tf.make_ndarray would refuse it. Fewer values are padded with the
    last one by both."""
    if not proto.tensor_content:
        count = math.prod(dim.size for dim in proto.tensor_shape.dim)
        extra = [field for field in VALUE_FIELDS if len(getattr(proto, field)) > count]
        if extra:
            proto = copy.deepcopy(proto)
            del getattr(proto, extra[0])[count:]
    return tf.make_ndarray(proto)


@returns_memory
def predict(core, request, run=None):
    """PredictionService.Predict for both front ends (gRPC and REST), so their codes and messages are one.

    `run(model, signature_name, inputs, output_filter)` runs the signature (default: LoadedModel.run; the
    batching scheduler's `run` with --enable_batching). The version is held while it runs, so an unload
    never closes its session mid-request. Returns a PredictResponse; raises ServingError with TF
    Serving's status code.
    """
    if not request.HasField("model_spec"):
        raise ServingError("INVALID_ARGUMENT", "Missing ModelSpec")
    with core.hold(request.model_spec) as (version, model):
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        model.signature(signature_name)
        inputs = {}
        for key, proto in request.inputs.items():
            try:
                if any(dim.size < 0 for dim in proto.tensor_shape.dim):  # Tensor::FromProto refuses these
                    raise ValueError(f"negative dimension in {key}")
                inputs[key] = tensor_from_proto(proto)
            except Exception:
                raise ServingError("INVALID_ARGUMENT", f"tensor parsing error: {key}") from None
        try:
            if run is None:
                outputs = model.run(signature_name, inputs, request.output_filter)
            else:
                outputs = run(model, signature_name, inputs, request.output_filter)
        except tf.errors.OpError as error:
            message = first_line(error)
            named = [key for key in request.inputs if key in message]
            if not named:  # e.g. "Invalid PNG data": say which input it came from
                message = f"{', '.join(sorted(request.inputs))}: {message}"
            raise ServingError(status_name(error), message) from None
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = version
    response.model_spec.signature_name = signature_name
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return response


def classify(core, request):
    """PredictionService.Classify, as classification_service.cc and classifier.cc check the signature.

    PatchNet exports only predict signatures (one image input, two or three outputs, no `inputs` key), so
    every request ends in TF Serving's error for such a signature; a model whose signature passed the
    checks would need tf.Example parsing in its graph, which no export here has: UNIMPLEMENTED.
    """
    _check_classify_regress_signature(core, request, _classify_problem)
    raise ServingError("UNIMPLEMENTED", "this server runs predict signatures only")


def regress(core, request):
    """PredictionService.Regress, as regression_service.cc and regressor.cc check the signature."""
    _check_classify_regress_signature(core, request, _regress_problem)
    raise ServingError("UNIMPLEMENTED", "this server runs predict signatures only")


def _check_classify_regress_signature(core, request, problem):
    if not request.HasField("model_spec"):
        raise ServingError("INVALID_ARGUMENT", "Missing ModelSpec")
    _, model = core.get(request.model_spec)
    name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = model.signature_defs.get(name)
    if signature is None:
        raise ServingError("INVALID_ARGUMENT", f"No signature was found with the name: {name}")
    message = problem(signature)
    if message:
        raise ServingError("INVALID_ARGUMENT", message)


def _debug_string(signature):
    return text_format.MessageToString(signature)  # the C++ DebugString(), as TF Serving's message has it


def _classify_problem(signature):
    """PreProcessClassification's checks (without --enable_signature_method_name_check, TF Serving's default)."""
    if len(signature.inputs) != 1:
        return "Expected one input Tensor."
    if len(signature.outputs) not in (1, 2):
        return f"Expected one or two output Tensors, found {len(signature.outputs)}"
    if CLASSIFY_INPUTS not in signature.inputs:
        return f"No classification inputs found in SignatureDef: {_debug_string(signature)}"
    if not set(CLASSIFY_OUTPUTS) & set(signature.outputs):
        return ('Expected classification signature outputs to contain at least one of "classes" or "scores". '
                f"Signature was: {_debug_string(signature)}")
    return None


def _regress_problem(signature):
    """PreProcessRegression's checks."""
    if len(signature.inputs) != 1:
        return "Expected one input Tensor."
    if len(signature.outputs) != 1:
        return "Expected one output Tensor."
    if CLASSIFY_INPUTS not in signature.inputs:
        return f"No regression inputs found in SignatureDef: {_debug_string(signature)}"
    if REGRESS_OUTPUTS not in signature.outputs:
        return f"No regression outputs found in SignatureDef: {_debug_string(signature)}"
    return None


def get_model_metadata(core, request):
    """PredictionService.GetModelMetadata for both front ends; raises ServingError."""
    # TF Serving checks the request before it looks the model up (get_model_metadata_impl.cc).
    if not request.HasField("model_spec"):
        raise ServingError("INVALID_ARGUMENT", "Missing ModelSpec")
    fields = list(request.metadata_field)
    if not fields:
        raise ServingError("INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one metadata_field")
    unsupported = [field for field in fields if field != "signature_def"]
    if unsupported:
        raise ServingError("INVALID_ARGUMENT", f"Metadata field {unsupported[0]} is not supported")
    version, model = core.get(request.model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in model.signature_defs.items():  # all of them, __saved_model_init_op too
        signature_map.signature_def[name].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = version
    response.metadata["signature_def"].Pack(signature_map)
    return response


def get_model_status(core, request):
    """ModelService.GetModelStatus for both front ends; raises ServingError.

    As get_model_status_impl.cc: a version_label is not looked at; without a version, every version.
    """
    if not request.HasField("model_spec"):
        raise ServingError("INVALID_ARGUMENT", "Missing ModelSpec")
    spec = request.model_spec
    requested = spec.version.value if spec.HasField("version") else None
    statuses = core.statuses(spec.name)
    if requested is not None:
        if requested not in statuses:
            raise ServingError("NOT_FOUND", f"Could not find version {requested} of model {spec.name}")
        statuses = {requested: statuses[requested]}
    elif not statuses:
        raise ServingError("NOT_FOUND", f"Could not find any versions of model {spec.name}")
    response = get_model_status_pb2.GetModelStatusResponse()
    # Newest first: ServableStateMonitor::VersionMap is ordered by std::greater<Version>.
    for version, (state, failure) in sorted(statuses.items(), reverse=True):
        status = response.model_version_status.add()
        status.version = version
        status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        status.status.SetInParent()  # TF Serving always sets it: error_code OK unless the load failed
        if failure is not None and failure.gave_up:  # TF Serving reports the load error once it gives up
            status.status.error_code = getattr(grpc.StatusCode, failure.code).value[0]
            status.status.error_message = failure.message
    return response
