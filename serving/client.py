"""`patchnet predict`: ask a TensorFlow Serving server (or `patchnet serve`) over gRPC.

Sends the images' encoded bytes (JPEG/PNG/BMP as they are on disk) to the
`classify` or `heatmap` signature through PredictionServiceStub, so it works
unchanged against the real tensorflow_model_server. Prints one JSON object
per image (probability and label); for the heatmap signature it also writes
<name>-heatmap.png (white = class-1 evidence) and <name>-overlay.png, the files
`patchnet heatmap` writes. A K-class model (docs/k-classes.md): each object has
the class name, the label and the K probabilities; heatmaps are
<name>-heatmap-<class>.png and <name>-overlay-<class>.png per class and
<name>-classes.png, the combined colour map. The heatmap signature does not
answer with the class names, so <class> is class0, class1, ...

    patchnet predict --server localhost:8500 --model patchnet a.png b.jpg
    patchnet predict --server localhost:8500 --model patchnet --signature heatmap --out maps a.png
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import cv2
import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from patchnet_launcher import host_port
from patchnet_tf.atomic import check_output_path
from patchnet_tf.errors import PatchNetError
from patchnet_tf.heatmaps import output_stems, write_heatmap_pngs
from serving.flags import DEFAULT_DEADLINE, DEFAULT_WAIT, SIGNATURES

MAX_MESSAGE = 256 << 20


@dataclasses.dataclass
class Prediction:
    image: str
    probability: float
    label: int
    heatmap: np.ndarray | None = None  # (H, W) at the model's input size, heatmap signature only; (H, W, K)
    probabilities: list | None = None  # K-class models: every class's probability
    class_name: str | None = None  # K-class models, classify signature: the label's name

    def as_dict(self):
        if self.probabilities is None:
            return {"image": self.image, "probability": self.probability, "label": self.label}
        return {"image": self.image, "class_name": self.class_name, "label": self.label,
                "probabilities": self.probabilities}


def connect(server):
    """A PredictionServiceStub on an insecure channel to host:port."""
    try:
        host_port(server)
    except argparse.ArgumentTypeError as error:
        raise PatchNetError(f"--server: {error}") from None
    channel = grpc.insecure_channel(
        server,
        options=[("grpc.max_send_message_length", MAX_MESSAGE),
                 ("grpc.max_receive_message_length", MAX_MESSAGE)],
    )
    return prediction_service_pb2_grpc.PredictionServiceStub(channel), channel


def build_request(model, images, signature="classify", version=None):
    """A PredictRequest with `images` (list of encoded bytes) as the image_bytes input."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
    return request


def call_with_retries(method, request, *, deadline=30.0, retries=4, backoff=0.25):
    """Calls a unary stub method; retries UNAVAILABLE (server starting or restarting) with backoff."""
    for attempt in range(retries + 1):
        try:
            return method(request, timeout=deadline)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == retries:
                raise
            time.sleep(backoff * 2**attempt)


def _read(image):
    if isinstance(image, bytes):
        return "<bytes>", image
    try:
        with open(image, "rb") as file:
            return image, file.read()
    except OSError as error:
        raise PatchNetError(f"{image}: cannot read ({error.strerror})") from None


def _refused(stub, model, names, data, signature, version, deadline):
    """The images the server refuses on their own, asked one at a time after a batch failed."""
    refused = []
    for name, image in zip(names, data):
        try:
            stub.Predict(build_request(model, [image], signature, version), timeout=deadline)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                refused.append(name)
    return refused


def predict(server, model, images, signature="classify", *, version=None, deadline=DEFAULT_DEADLINE,
            retries=4, wait=DEFAULT_WAIT, stub=None):
    """Images (paths or encoded bytes) -> list of Prediction; `server` is host:port.

    Waits up to `wait` seconds for the server to come up (TF Serving, like the
    local server, listens only once its models are loaded: about a minute
    for the paper's model). Raises PatchNetError with the server's status
    code and message on failure.
    """
    if signature not in SIGNATURES:
        raise PatchNetError(f"--signature must be one of {', '.join(SIGNATURES)}, got {signature!r}")
    names, data = zip(*[_read(image) for image in images]) if images else ((), ())
    if not data:
        raise PatchNetError("no images given")
    channel = None
    if stub is None:
        stub, channel = connect(server)
        try:
            grpc.channel_ready_future(channel).result(timeout=wait)
        except grpc.FutureTimeoutError:
            channel.close()
            raise PatchNetError(f"{server}: no server answered within --wait {wait:g} s") from None
    try:
        response = call_with_retries(
            stub.Predict, build_request(model, data, signature, version),
            deadline=deadline, retries=retries,
        )
    except grpc.RpcError as error:
        message = f"{server}: {error.code().name}: {error.details()}"
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT and "image_bytes" in (error.details() or ""):
            # The server names the input, not the file: the client knows which files it sent.
            bad = names if len(names) == 1 else _refused(stub, model, names, data, signature, version, deadline)
            message = f"{', '.join(bad or names)}: {message}"
        raise PatchNetError(message) from None
    finally:
        if channel is not None:
            channel.close()
    outputs = {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}
    heatmaps = outputs.get("heatmap")
    if "probabilities" in outputs:  # a K-class model
        probabilities = outputs["probabilities"]
        label = outputs.get("label", probabilities.argmax(axis=1))
        class_names = outputs.get("class_name")
        return [
            Prediction(name, float(probabilities[index, label[index]]), int(label[index]),
                       None if heatmaps is None else heatmaps[index],
                       probabilities=[float(value) for value in probabilities[index]],
                       class_name=None if class_names is None else class_names[index].decode())
            for index, name in enumerate(names)
        ]
    probability = outputs["probability"]
    label = outputs.get("label", (probability >= 0.5).astype(np.int64))
    return [
        Prediction(name, float(probability[index]), int(label[index]),
                   None if heatmaps is None else heatmaps[index])
        for index, name in enumerate(names)
    ]


def write_heatmaps(predictions, out_dir):
    """The heatmap PNGs of each prediction, named as `patchnet heatmap` names them; returns their paths.

    Overlays only for images read from a file (sent bytes have no file to draw on)."""
    written = []
    stems = output_stems([prediction.image or f"image{index}" for index, prediction in enumerate(predictions)])
    for prediction, stem in zip(predictions, stems):
        maps = prediction.heatmap  # (H, W), or (H, W, K) of a K-class model
        class_names = [f"class{k}" for k in range(maps.shape[-1] if maps.ndim == 3 else 2)]
        original = cv2.imread(prediction.image, cv2.IMREAD_COLOR) if os.path.isfile(prediction.image) else None
        rgb = None
        if original is not None:
            rgb = cv2.cvtColor(cv2.resize(original, maps.shape[1::-1], interpolation=cv2.INTER_AREA),
                               cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        written += write_heatmap_pngs(os.path.join(out_dir, stem), maps, class_names, rgb)
    return written


def run(args):
    if args.signature == "heatmap":
        check_output_path(args.out, "--out")
    predictions = predict(args.server, args.model, args.images, args.signature, version=args.version,
                          deadline=args.deadline, retries=args.retries, wait=args.wait)
    written = write_heatmaps(predictions, args.out) if args.signature == "heatmap" else []
    for prediction in predictions:
        print(json.dumps(prediction.as_dict()))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
