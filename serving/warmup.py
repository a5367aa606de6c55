"""Warmup records and infra-validation (TFX InfraValidator, done locally).

TF Serving replays `assets.extra/tf_serving_warmup_requests` (a TFRecord of
`PredictionLog`, at most 1000 records) when it loads a version, before the
version takes traffic. `write_warmup_requests` writes one request per
signature; `validate_export` loads the SavedModel with the session loader,
replays every record and checks the outputs; `infra_validate` does that in a
fresh Python process, as the InfraValidator does in a fresh server, so
nothing cached in the caller (traced functions, loaded ops) can hide a
problem.

    python -m serving.warmup EXPORT_DIR     # exit 0 and one line on success
"""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from patchnet_tf.errors import PatchNetError
from serving.loader import DEFAULT_SIGNATURE, WARMUP_PATH, LoadedModel, first_line

MAX_WARMUP_RECORDS = 1000  # TF Serving reads at most this many


def sample_png(height=40, width=48, seed=0):
    """A small deterministic RGB PNG: warmup needs a real encoded image."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def warmup_requests(signatures, model_name, images=None):
    """One PredictRequest per signature (name -> SignatureDef), image inputs from `images` bytes."""
    images = list(images or [sample_png(), sample_png(seed=1)])
    decoded = [cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2RGB) for data in images]
    height, width = decoded[0].shape[:2]
    pixels = np.stack([cv2.resize(image, (width, height)) for image in decoded]).astype(np.float32)
    requests = []
    for name in sorted(signatures):
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=name)
        )
        # Heatmaps are the slow signature: one image is enough to warm them up.
        count = 1 if "heatmap" in signatures[name].outputs else len(images)
        for key, info in signatures[name].inputs.items():
            if info.dtype == tf.string.as_datatype_enum:
                request.inputs[key].CopyFrom(tf.make_tensor_proto(images[:count], dtype=tf.string))
            else:
                request.inputs[key].CopyFrom(tf.make_tensor_proto(pixels[:count], dtype=tf.float32))
        requests.append(request)
    return requests


def write_warmup_requests(export_dir, model_name, images=None):
    """Writes assets.extra/tf_serving_warmup_requests covering every signature; returns its path."""
    loaded = LoadedModel(export_dir)
    try:
        requests = warmup_requests(loaded.signatures, model_name, images)
    finally:
        loaded.close()
    if len(requests) > MAX_WARMUP_RECORDS:
        raise PatchNetError(f"{len(requests)} warmup records; TF Serving reads at most {MAX_WARMUP_RECORDS}")
    path = os.path.join(export_dir, WARMUP_PATH)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for request in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def read_warmup_requests(export_dir):
    path = os.path.join(export_dir, WARMUP_PATH)
    if not os.path.isfile(path):
        raise PatchNetError(f"{path}: no warmup records")
    requests = []
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
        log = prediction_log_pb2.PredictionLog.FromString(record)
        if log.WhichOneof("log_type") != "predict_log":
            raise PatchNetError(f"{path}: a {log.WhichOneof('log_type')} record; expected predict_log")
        requests.append(log.predict_log.request)
    return requests


def check_outputs(signature_name, inputs, outputs):
    """Shapes and ranges every signature promises (docs/serving.md); raises on the first problem."""
    batch = next(iter(inputs.values())).shape[0]

    def fail(text):
        raise PatchNetError(f"signature {signature_name}: {text}")

    if "probabilities" in outputs:
        return _check_k_class_outputs(batch, outputs, fail)
    probability = outputs.get("probability")
    if probability is None or probability.shape != (batch,) or probability.dtype != np.float32:
        fail(f"probability must be float32 [{batch}], got {getattr(probability, 'shape', None)}")
    if not np.all(np.isfinite(probability)) or probability.min() < 0 or probability.max() > 1:
        fail("probability outside [0, 1] or not finite")
    if "label" in outputs:
        label = outputs["label"]
        if label.shape != (batch,) or label.dtype != np.int64 or not set(label.tolist()) <= {0, 1}:
            fail(f"label must be int64 [{batch}] in {{0, 1}}, got {label.dtype} {label.shape}")
        if not np.array_equal(label, (probability >= 0.5).astype(np.int64)):
            fail("label disagrees with probability >= 0.5")
    if "heatmap" in outputs:
        heat = outputs["heatmap"]
        if heat.ndim != 3 or heat.shape[0] != batch or heat.dtype != np.float32:
            fail(f"heatmap must be float32 [{batch}, H, W], got {heat.dtype} {heat.shape}")
        if not np.all(np.isfinite(heat)) or heat.min() < 0 or heat.max() > 1:
            fail("heatmap outside [0, 1] or not finite")
    if "label" not in outputs and "heatmap" not in outputs:
        fail(f"unexpected outputs {sorted(outputs)}")


def _check_k_class_outputs(batch, outputs, fail):
    """A K-class export's outputs (pipelines/export.py): probabilities [B, K] summing to 1,
    label [B] their argmax, class_name [B] strings, heatmap [B, H, W, K] in [0, 1]."""
    probabilities = outputs["probabilities"]
    if probabilities.ndim != 2 or probabilities.shape[0] != batch or probabilities.dtype != np.float32:
        fail(f"probabilities must be float32 [{batch}, K], got {probabilities.dtype} {probabilities.shape}")
    if not np.all(np.isfinite(probabilities)) or probabilities.min() < 0 or probabilities.max() > 1:
        fail("probabilities outside [0, 1] or not finite")
    if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4):
        fail("probabilities of an image do not sum to 1")
    classes = probabilities.shape[1]
    if "label" in outputs:
        label, names = outputs["label"], outputs.get("class_name")
        if label.shape != (batch,) or label.dtype != np.int64 or not set(label.tolist()) <= set(range(classes)):
            fail(f"label must be int64 [{batch}] in 0..{classes - 1}, got {label.dtype} {label.shape}")
        if not np.array_equal(label, probabilities.argmax(axis=1)):
            fail("label is not the most probable class")
        if names is None or names.shape != (batch,) or not all(isinstance(name, bytes) and name for name in names):
            fail(f"class_name must be a non-empty string [{batch}]")
    if "heatmap" in outputs:
        heat = outputs["heatmap"]
        if heat.ndim != 4 or heat.shape[0] != batch or heat.shape[-1] != classes or heat.dtype != np.float32:
            fail(f"heatmap must be float32 [{batch}, H, W, {classes}], got {heat.dtype} {heat.shape}")
        if not np.all(np.isfinite(heat)) or heat.min() < 0 or heat.max() > 1:
            fail("heatmap outside [0, 1] or not finite")
    if "label" not in outputs and "heatmap" not in outputs:
        fail(f"unexpected outputs {sorted(outputs)}")


def replay_warmup(loaded, export_dir, check=None):
    """Runs the export's warmup requests through `loaded`, as TF Serving does before a
    version takes traffic; `check(signature, inputs, outputs)` may vet each answer.

    Returns (requests, signature names covered); raises PatchNetError on the first failure.
    """
    requests = read_warmup_requests(export_dir)
    covered = set()
    for request in requests:
        name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
        try:
            outputs = loaded.run(name, inputs)
        except Exception as error:
            raise PatchNetError(f"signature {name}: warmup request failed: {first_line(error)}") from None
        if check is not None:
            check(name, inputs, outputs)
        covered.add(name)
    return requests, covered


def validate_export(export_dir):
    """Loads `export_dir` as TF Serving does, replays its warmup requests, checks the answers.

    Returns a one-line summary; raises PatchNetError naming what failed.
    """
    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")):
        raise PatchNetError(f"{export_dir}: no saved_model.pb")
    try:
        loaded = LoadedModel(export_dir)
    except Exception as error:
        raise PatchNetError(f"{export_dir}: the session loader failed: {first_line(error)}") from None
    try:
        requests, covered = replay_warmup(loaded, export_dir, check=check_outputs)
        missing = sorted(set(loaded.signatures) - covered)
        if missing:
            raise PatchNetError(f"warmup records cover no request for signature(s) {', '.join(missing)}")
    finally:
        loaded.close()
    return f"{export_dir}: loaded; {len(requests)} warmup requests answered over {len(covered)} signatures"


def infra_validate(export_dir, timeout=300):
    """`validate_export` in a fresh Python process; raises PatchNetError with its reason."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment["PYTHONPATH"] = os.pathsep.join(
        [repo_root] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    try:
        result = subprocess.run(
            [sys.executable, "-m", "serving.warmup", "--json", export_dir],
            capture_output=True, text=True, timeout=timeout, env=environment,
        )
    except subprocess.TimeoutExpired:
        raise PatchNetError(f"{export_dir}: the validating process did not finish in {timeout} s") from None
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PatchNetError(f"the validating process exited with {result.returncode}: {tail}")
    answer = json.loads(lines[-1])
    if not answer["ok"]:
        raise PatchNetError(answer["message"])
    return answer["message"]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    argv = [arg for arg in argv if arg != "--json"]
    if len(argv) != 1:
        print("usage: python -m serving.warmup [--json] EXPORT_DIR", file=sys.stderr)
        return 2
    try:
        message, ok = validate_export(argv[0]), True
    except PatchNetError as error:
        message, ok = str(error), False
    print(json.dumps({"ok": ok, "message": message}) if as_json else message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
