"""K-class exports and serving (issue 12): `classify` gives probabilities [B, K], label [B]
and class_name [B]; `heatmap` gives [B, H, W, K]; over the local TF-Serving-compatible
server they equal the in-process model within 1e-5. Binary exports are tested unchanged
in test_export.py and test_serving.py."""

import json

import cv2
import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from patchnet_tf import build_patchnet, heatmap
from patchnet_tf.cli import main as cli_main
from patchnet_tf.preprocessing import Preprocessing, decode_image
from pipelines.export import SIGNATURES, write_saved_model
from pipelines.push import blessing, copy_version, evaluate_export
from serving import client, warmup
from serving.loader import LoadedModel
from serving.server import start_server

MODEL = "kclass"
TOLERANCE = 1e-5
CLASS_NAMES = ("nevus", "melanoma", "seborrheic_keratosis")
PREPROCESSING = Preprocessing(image_size=(24, 28), class_names=CLASS_NAMES, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25))


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(40, 48), (24, 28), (57, 23)]
    return [cv2.imencode(".png", rng.integers(0, 256, (*shapes[i % 3], 3), dtype=np.uint8))[1].tobytes()
            for i in range(count)]


def _expected(model, data):
    inputs = np.stack([PREPROCESSING(decode_image(item)).numpy() for item in data])
    return model(inputs, training=False).numpy(), heatmap(model, inputs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = build_patchnet(9, filters=4, conv_layers=2, padding="valid", classes=3)
    rng = np.random.default_rng(0)
    for weight in model.get_layer("subnet").weights:  # spread the probabilities, so labels differ
        weight.assign(weight.numpy() + rng.normal(0.0, 0.5, weight.shape).astype("float32"))
    export_dir = write_saved_model(model, PREPROCESSING, str(tmp_path_factory.mktemp("export") / "1"))
    return model, export_dir


def test_k_class_signatures_and_session_loader_equal_keras(exported):
    model, export_dir = exported
    loaded = LoadedModel(export_dir)
    try:
        assert set(SIGNATURES) <= set(loaded.signatures)
        assert set(loaded.signatures["classify"].outputs) == {"probabilities", "label", "class_name"}
        assert set(loaded.signatures["heatmap_images"].outputs) == {"heatmap", "probabilities"}
        data = _images(3)
        probabilities, maps = _expected(model, data)
        out = loaded.run("classify", {"image_bytes": np.array(data, dtype=object)})
        np.testing.assert_allclose(out["probabilities"], probabilities, atol=TOLERANCE)
        np.testing.assert_array_equal(out["label"], probabilities.argmax(axis=1))
        assert [name.decode() for name in out["class_name"]] == [CLASS_NAMES[k] for k in probabilities.argmax(1)]
        out = loaded.run("heatmap", {"image_bytes": np.array(data, dtype=object)})
        assert out["heatmap"].shape == (3, 24, 28, 3)
        np.testing.assert_allclose(out["heatmap"], maps, atol=TOLERANCE)
    finally:
        loaded.close()
    # Warmup covers every K-class signature and its answers pass the output checks.
    warmup.write_warmup_requests(export_dir, MODEL, _images(2, seed=5))
    assert "5 signatures" in warmup.validate_export(export_dir)
    with pytest.raises(Exception, match="label is not the most probable class"):
        warmup.check_outputs("classify", {"image_bytes": np.zeros(1)},
                             {"probabilities": np.array([[0.1, 0.7, 0.2]], np.float32),
                              "label": np.array([0]), "class_name": np.array([b"x"], object)})


def test_served_k_class_signatures_equal_in_process_outputs(exported, tmp_path, capsys):
    model, export_dir = exported
    base = tmp_path / MODEL
    copy_version(export_dir, str(base), 1)
    server = start_server(str(base), MODEL, port=0, poll_seconds=0.2)
    channel = None
    try:
        server.wait_for_version(1)
        data = _images(3, seed=1)
        probabilities, maps = _expected(model, data)
        channel = grpc.insecure_channel(server.address)
        stub = client.prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for signature in ("classify", "heatmap"):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = MODEL
            request.model_spec.signature_name = signature
            request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(data, dtype=tf.string))
            out = {key: tf.make_ndarray(proto) for key, proto in stub.Predict(request).outputs.items()}
            np.testing.assert_allclose(out["probabilities"], probabilities, atol=TOLERANCE)
            if signature == "heatmap":
                np.testing.assert_allclose(out["heatmap"], maps, atol=TOLERANCE)
            else:
                assert [name.decode() for name in out["class_name"]] == [CLASS_NAMES[k] for k in
                                                                         probabilities.argmax(1)]
        pixels = np.random.default_rng(3).integers(0, 256, (2, 30, 31, 3)).astype(np.float32)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL
        request.model_spec.signature_name = "heatmap_images"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(pixels))
        out = {key: tf.make_ndarray(proto) for key, proto in stub.Predict(request).outputs.items()}
        inputs = PREPROCESSING(tf.constant(pixels / 255.0)).numpy()
        np.testing.assert_allclose(out["heatmap"], heatmap(model, inputs), atol=TOLERANCE)

        # `patchnet predict` prints the class names and writes one map per class plus the colour map.
        paths = []
        for index, item in enumerate(data[:2]):
            paths.append(str(tmp_path / f"img{index}.png"))
            with open(paths[-1], "wb") as file:
                file.write(item)
        assert cli_main(["predict", "--server", server.address, "--model", MODEL, *paths]) == 0
        answers = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert [answer["class_name"] for answer in answers] == [CLASS_NAMES[k] for k in probabilities[:2].argmax(1)]
        np.testing.assert_allclose([answer["probabilities"] for answer in answers], probabilities[:2], atol=TOLERANCE)
        assert cli_main(["predict", "--server", server.address, "--model", MODEL, "--signature", "heatmap",
                         "--out", str(tmp_path / "maps"), paths[0]]) == 0
        for klass in range(3):
            gray = cv2.imread(str(tmp_path / "maps" / f"img0-heatmap-class{klass}.png"), cv2.IMREAD_UNCHANGED)
            np.testing.assert_allclose(gray / 255.0, maps[0][..., klass], atol=1 / 255)
        assert cv2.imread(str(tmp_path / "maps" / "img0-classes.png")).shape == (24, 28, 3)
    finally:
        if channel is not None:
            channel.close()
        server.stop()


def test_push_blesses_k_class_exports_on_macro_auroc(exported, tmp_path):
    model, export_dir = exported
    data = _images(6, seed=2)
    paths = []
    for index, item in enumerate(data):
        paths.append(str(tmp_path / f"{index}.png"))
        with open(paths[-1], "wb") as file:
            file.write(item)
    probabilities, _ = _expected(model, data)
    labels = np.array([0, 1, 2, 0, 1, 2])
    evaluation = evaluate_export(export_dir, paths, labels)
    from sklearn.metrics import roc_auc_score

    macro = np.mean([roc_auc_score(labels == k, probabilities[:, k]) for k in range(3)])
    assert evaluation.auroc == pytest.approx(macro, abs=1e-6)
    assert evaluation.accuracy == pytest.approx(np.mean(probabilities.argmax(1) == labels))
    reason = blessing(evaluation, None, min_auroc=1.0)
    assert reason and "AUROC" in reason


def test_push_of_a_k_class_run_end_to_end(tmp_path):
    """export, evaluate (macro AUROC), bless, warm up, infra-validate, copy: a served K-class version."""
    from pipelines.push import push

    names = ("black", "grey", "white")
    data = tmp_path / "data"
    for value, name in zip((0, 128, 255), names):
        (data / name).mkdir(parents=True)
        for index in range(4):
            cv2.imwrite(str(data / name / f"{index}.png"), np.full((24, 28, 3), value, np.uint8))
    run = tmp_path / "run"
    run.mkdir()
    keras.utils.set_random_seed(0)
    build_patchnet(9, filters=4, conv_layers=2, padding="valid", classes=3).save(str(run / "model.keras"))
    Preprocessing(image_size=(24, 28), class_names=names).save(str(run))
    logs = []
    version = push(str(run), str(tmp_path / "models" / MODEL), data_dir=str(data), model_name=MODEL,
                   min_auroc=0.0, log=logs.append)
    assert version == 1 and any("macro" in line.lower() or "auroc" in line.lower() for line in logs)
    loaded = LoadedModel(str(tmp_path / "models" / MODEL / "1"))
    try:
        image = cv2.imencode(".png", np.full((24, 28, 3), 255, np.uint8))[1].tobytes()
        outputs = loaded.run("classify", {"image_bytes": np.array([image], object)}, [])
        assert outputs["probabilities"].shape == (1, 3)
        assert outputs["class_name"][0].decode() == names[int(outputs["label"][0])]
    finally:
        loaded.close()
