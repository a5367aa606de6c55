"""The exported SavedModel, run the way TensorFlow Serving runs it (docs/serving.md).

tensorflow_model_server is not installable here, so these tests load the
export with the TF1 session loader (the Python twin of its C++
LoadSavedModel), run each signature by its SignatureDef tensor names, and
use saved_model_cli; results must equal the Keras model's within 1e-5.
"""

import os
import subprocess
import sys

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from patchnet_tf import build_patchnet, heatmap
from patchnet_tf.cli import main as cli_main
from patchnet_tf.preprocessing import Preprocessing, decode_image
from pipelines.export import SIGNATURES, export_saved_model, write_saved_model
from serving.loader import LoadedModel

IMAGE_SIZE = (32, 32)
TOLERANCE = 1e-5


def encode(image, extension=".png"):
    ok, data = cv2.imencode(extension, image)
    assert ok
    return data.tobytes()


def sample_images():
    """Encoded images of different sizes and formats (the server sees them as they come)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 48), (32, 32), (57, 23))]
    images[1][:16, :16] = 255
    return [encode(images[0]), encode(images[1], ".bmp"), encode(images[2], ".jpg")]


def keras_reference(model, preprocessing, image_bytes):
    inputs = np.stack([preprocessing(decode_image(data)).numpy() for data in image_bytes])
    probability = model(inputs, training=False).numpy()[:, 0]
    return inputs, probability, heatmap(model, inputs)


@pytest.fixture(scope="module", params=["same", "valid"])
def exported(request, tmp_path_factory):
    """One export per padding, shared by the module's tests."""
    keras.utils.set_random_seed(0)
    run_dir = tmp_path_factory.mktemp(f"run-{request.param}")
    model = build_patchnet(9, filters=4, conv_layers=2, padding=request.param)
    preprocessing = Preprocessing(image_size=IMAGE_SIZE)
    model.save(run_dir / "model.keras")
    preprocessing.save(str(run_dir))
    export_dir = str(run_dir / "export")
    export_saved_model(str(run_dir), export_dir)
    loaded = LoadedModel(export_dir)
    yield model, preprocessing, export_dir, loaded
    loaded.close()


def test_signatures_are_the_contract(exported):
    _, _, _, loaded = exported
    assert set(loaded.signatures) == set(SIGNATURES)
    string, float32, int64 = (dtype.as_datatype_enum for dtype in (tf.string, tf.float32, tf.int64))
    height, width = IMAGE_SIZE

    def spec(info):
        return info.dtype, [dim.size for dim in info.tensor_shape.dim]

    for name in SIGNATURES:
        signature = loaded.signatures[name]
        assert signature.method_name == "tensorflow/serving/predict"
        if name.endswith("_images"):
            assert {k: spec(v) for k, v in signature.inputs.items()} == {"images": (float32, [-1, -1, -1, 3])}
        else:
            assert {k: spec(v) for k, v in signature.inputs.items()} == {"image_bytes": (string, [-1])}
        outputs = {k: spec(v) for k, v in signature.outputs.items()}
        if name.startswith("heatmap"):
            assert outputs == {"heatmap": (float32, [-1, height, width]), "probability": (float32, [-1])}
        else:
            assert outputs == {"probability": (float32, [-1]), "label": (int64, [-1])}


def test_session_loader_equals_keras(exported):
    model, preprocessing, _, loaded = exported
    image_bytes = sample_images()
    inputs, probability, heat = keras_reference(model, preprocessing, image_bytes)
    feed = {"image_bytes": np.array(image_bytes, dtype=object)}
    for name in ("classify", "serving_default"):
        out = loaded.run(name, feed)
        np.testing.assert_allclose(out["probability"], probability, atol=TOLERANCE)
        np.testing.assert_array_equal(out["label"], (probability >= 0.5).astype(np.int64))
    out = loaded.run("heatmap", feed)
    np.testing.assert_allclose(out["probability"], probability, atol=TOLERANCE)
    np.testing.assert_allclose(out["heatmap"], heat, atol=TOLERANCE)
    assert out["heatmap"].min() >= 0 and out["heatmap"].max() <= 1


def test_images_signatures_take_0_to_255_at_any_size(exported):
    model, preprocessing, _, loaded = exported
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (2, 45, 37, 3)).astype(np.float32)
    inputs = preprocessing(tf.constant(pixels / 255.0, tf.float32)).numpy()
    probability = model(inputs).numpy()[:, 0]
    out = loaded.run("classify_images", {"images": pixels})
    np.testing.assert_allclose(out["probability"], probability, atol=TOLERANCE)
    out = loaded.run("heatmap_images", {"images": pixels})
    np.testing.assert_allclose(out["heatmap"], heatmap(model, inputs), atol=TOLERANCE)


def _graph_ops(export_dir):
    """Every op type and attr in the graph, including nested functions (map_fn, while bodies)."""
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as file:
        saved_model.ParseFromString(file.read())
    (meta_graph,) = saved_model.meta_graphs
    graph = meta_graph.graph_def
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
    function_attrs = [function.attr for function in graph.library.function]
    return nodes, function_attrs


def test_graph_is_core_float32_and_xla_free(exported):
    _, _, export_dir, _ = exported
    nodes, function_attrs = _graph_ops(export_dir)
    ops = {node.op for node in nodes}
    functions = {f.signature.name for f in saved_model_pb2.SavedModel().meta_graphs}  # none; ops only
    core = set(dir(tf.raw_ops))
    # Calls to functions of the library appear as ops named after the function.
    library_names = set()
    saved_model = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as file:
        saved_model.ParseFromString(file.read())
    for function in saved_model.meta_graphs[0].graph_def.library.function:
        library_names.add(function.signature.name)
    assert not functions
    not_core = sorted(ops - core - library_names)
    assert not not_core, f"ops not registered in core TensorFlow: {not_core}"
    assert "DecodeImage" in ops and "Conv2D" in ops  # the in-graph preprocessing and the subnet
    assert not {op for op in ops if op.startswith("Xla") or op == "_XlaCompile"}
    for node in nodes:
        assert not node.attr["_XlaMustCompile"].b, node.name
        for key, value in node.attr.items():
            assert value.type != tf.float16.as_datatype_enum, f"{node.name}: float16 attr {key}"
    for attrs in function_attrs:
        assert not attrs["_XlaMustCompile"].b


@pytest.mark.parametrize("exported", ["same"], indirect=True)  # two processes: once is enough
def test_saved_model_cli_show_and_run(exported, tmp_path):
    model, preprocessing, export_dir, _ = exported
    cli = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    shown = subprocess.run(cli + ["show", "--dir", export_dir, "--all"], capture_output=True,
                           text=True, env=env, check=True).stdout
    for name in SIGNATURES:
        assert f"signature_def['{name}']" in shown
    image_bytes = sample_images()
    np.save(tmp_path / "bytes.npy", np.array(image_bytes, dtype=object), allow_pickle=True)
    subprocess.run(
        cli + ["run", "--dir", export_dir, "--tag_set", "serve", "--signature_def", "classify",
               "--inputs", f"image_bytes={tmp_path / 'bytes.npy'}", "--outdir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, check=True,
    )
    _, probability, _ = keras_reference(model, preprocessing, image_bytes)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "probability.npy"), probability, atol=TOLERANCE)


def test_bad_bytes_and_empty_batch_fail_in_the_graph_naming_the_input(exported):
    """What the stock server (which checks no shapes itself) answers comes from these asserts."""
    _, _, _, loaded = exported
    signature = loaded.signatures["classify"]
    run = lambda value: loaded.session.run(  # noqa: E731 - bypass the local checks on purpose
        signature.outputs["probability"].name, {signature.inputs["image_bytes"].name: value}
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="image_bytes: not a JPEG, PNG, GIF or BMP"):
        run(np.array([sample_images()[0], b"not an image"], dtype=object))
    with pytest.raises(tf.errors.InvalidArgumentError, match="image_bytes: empty batch"):
        run(np.array([], dtype=object))


def test_heatmap_chunks_and_batches_agree(tmp_path):
    """A small chunk (many subnet calls per image) and a batch give the per-image map."""
    keras.utils.set_random_seed(1)
    model = build_patchnet(9, filters=4, conv_layers=2)
    preprocessing = Preprocessing(image_size=(24, 20))
    export_dir = write_saved_model(model, preprocessing, str(tmp_path / "export"), chunk_patches=7)
    loaded = LoadedModel(export_dir)
    image_bytes = sample_images()
    inputs, _, heat = keras_reference(model, preprocessing, image_bytes)
    out = loaded.run("heatmap", {"image_bytes": np.array(image_bytes, dtype=object)})
    assert out["heatmap"].shape == (3, 24, 20)
    np.testing.assert_allclose(out["heatmap"], heat, atol=TOLERANCE)
    loaded.close()


def test_mixed_precision_model_exports_float32(tmp_path):
    keras.utils.set_random_seed(2)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = build_patchnet(9, filters=4, conv_layers=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert mixed.get_layer("subnet").get_layer("conv1").compute_dtype == "float16"
    reference = build_patchnet(9, filters=4, conv_layers=2)
    reference.set_weights(mixed.get_weights())
    preprocessing = Preprocessing(image_size=IMAGE_SIZE)
    export_dir = write_saved_model(mixed, preprocessing, str(tmp_path / "export"))
    nodes, _ = _graph_ops(export_dir)
    half = tf.float16.as_datatype_enum
    assert not [n.name for n in nodes if any(v.type == half for v in n.attr.values())]
    loaded = LoadedModel(export_dir)
    image_bytes = sample_images()
    _, probability, heat = keras_reference(reference, preprocessing, image_bytes)
    out = loaded.run("heatmap", {"image_bytes": np.array(image_bytes, dtype=object)})
    np.testing.assert_allclose(out["probability"], probability, atol=TOLERANCE)
    np.testing.assert_allclose(out["heatmap"], heat, atol=TOLERANCE)
    loaded.close()


def test_export_cli(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]) == 2
    assert "no such model file" in capsys.readouterr().err
    keras.utils.set_random_seed(0)
    build_patchnet(9, filters=4, conv_layers=2).save(tmp_path / "model.keras")
    Preprocessing(image_size=IMAGE_SIZE).save(str(tmp_path))
    os.makedirs(tmp_path / "taken")
    assert cli_main(["export", str(tmp_path), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "model.keras"), "--out", str(tmp_path / "e")]) == 0
    assert os.path.isfile(tmp_path / "e" / "saved_model.pb")
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".export-")]
