"""The answers of TF Serving's APIs, called by both front ends (gRPC in `serving.server`, REST in
`serving.rest`), so that their codes and messages are one: Predict,
GetModelMetadata, GetModelStatus. Each takes the request proto and returns the response proto, or
raises ServingError with TF Serving's status code and message.
"""

import grpc
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from serving.core import status_name
from serving.errors import ServingError
from serving.loader import DEFAULT_SIGNATURE, first_line


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
                inputs[key] = tf.make_ndarray(proto)
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
    for name, signature in model.signatures.items():
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
    for version, (state, failure) in sorted(statuses.items()):
        status = response.model_version_status.add()
        status.version = version
        status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        status.status.SetInParent()  # TF Serving always sets it: error_code OK unless the load failed
        if failure is not None and failure.gave_up:  # TF Serving reports the load error once it gives up
            status.status.error_code = getattr(grpc.StatusCode, failure.code).value[0]
            status.status.error_message = failure.message
    return response
