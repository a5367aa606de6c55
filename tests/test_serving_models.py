"""The local server's ServerCore: version policies, version labels, several models from a
ModelServerConfig file reloaded on change, HandleReloadConfigRequest, the message size cap."""


import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2
from test_serving import TOLERANCE, expected, images, outputs, request, wait_until

from patchnet_tf.atomic import atomic_write_text
from patchnet_tf.cli import main as cli_main
from pipelines.push import copy_version
from serving.server import start_server

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


def write_config(path, models):
    """models: {name: (base, extra text inside the model's config block)} -> a ModelServerConfig file."""
    blocks = "".join(
        f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" {extra} }}\n'
        for name, (base, extra) in models.items()
    )
    text = f"model_config_list {{\n{blocks}}}\n"
    text_format.Parse(text, model_server_config_pb2.ModelServerConfig())  # the test writes a valid file
    atomic_write_text(str(path), text)


def versions_folder(tmp_path, dirs, name, sources):
    """BASE/<v> for v, source index in `sources` ({version: index into dirs})."""
    base = tmp_path / name
    for version, index in sources.items():
        copy_version(dirs[index], str(base), version)
    return base


def stubs(server):
    channel = grpc.insecure_channel(server.address)
    return (prediction_service_pb2_grpc.PredictionServiceStub(channel),
            model_service_pb2_grpc.ModelServiceStub(channel))


def predict(stub, model, data, version=None, label=None):
    req = request(inputs={"image_bytes": tf.make_tensor_proto(data, tf.string)}, model=model, version=version)
    if label is not None:
        req.model_spec.version_label = label
    response = stub.Predict(req, timeout=60)
    return response.model_spec.version.value, outputs(response)["probability"]


def rpc_error(call):
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def test_version_policies_all_and_specific_reloaded_from_the_config_file(exports, tmp_path):
    models, dirs = exports
    base = versions_folder(tmp_path, dirs, "m", {1: 0, 2: 1, 3: 0})
    config = tmp_path / "models.config"
    write_config(config, {"m": (base, "model_version_policy { all {} }")})
    server = start_server(model_config_file=str(config), model_config_file_poll_wait_seconds=0.1, poll_seconds=0.1)
    try:
        assert server.versions("m") == [1, 2, 3]
        stub, _ = stubs(server)
        data = images(2)
        version, probability = predict(stub, "m", data, version=2)
        assert version == 2
        np.testing.assert_allclose(probability, expected(models[1], data)[0], atol=TOLERANCE)
        # specific: only the listed versions that exist; version 9 is waited for, not an error.
        write_config(config, {"m": (base, "model_version_policy { specific { versions: 1 versions: 3 versions: 9 } }")})
        wait_until(lambda: server.versions("m") == [1, 3])
        assert rpc_error(lambda: predict(stub, "m", data, version=2))[0] == grpc.StatusCode.NOT_FOUND
        copy_version(dirs[1], str(base), 9)
        wait_until(lambda: server.versions("m") == [1, 3, 9])
        assert predict(stub, "m", data)[0] == 9  # no version: the highest loaded
        write_config(config, {"m": (base, "model_version_policy { latest { num_versions: 2 } }")})
        wait_until(lambda: server.versions("m") == [3, 9])
    finally:
        server.stop()


def test_version_labels_as_tf_serving(exports, tmp_path, capsys):
    models, dirs = exports
    base = versions_folder(tmp_path, dirs, "m", {1: 0, 2: 1})
    config = tmp_path / "models.config"
    labels = 'version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 2 }'
    write_config(config, {"m": (base, f"model_version_policy {{ all {{}} }} {labels}")})
    # TF Serving assigns labels before any version loads, so at start-up they need the flag.
    assert cli_main(["serve", "--model-config-file", str(config), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"patchnet serve: error: {config}: FAILED_PRECONDITION: Request to assign label to version 2 of model m, "
        "which is not currently available for inference")
    write_config(config, {"m": (base, f'model_version_policy {{ all {{}} }} {labels} '
                                      'version_labels { key: "next" value: 7 }')})
    server = start_server(model_config_file=str(config), allow_version_labels_for_unavailable_models=True)
    try:
        stub, status_stub = stubs(server)
        data = images(2)
        for label, version, model in (("stable", 1, models[0]), ("canary", 2, models[1])):
            served, probability = predict(stub, "m", data, label=label)
            assert served == version
            np.testing.assert_allclose(probability, expected(model, data)[0], atol=TOLERANCE)
            metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            metadata.model_spec.name, metadata.model_spec.version_label = "m", label
            assert stub.GetModelMetadata(metadata).model_spec.version.value == version
        assert rpc_error(lambda: predict(stub, "m", data, label="beta")) == (
            grpc.StatusCode.INVALID_ARGUMENT, "Unrecognized servable version label: beta")
        assert rpc_error(lambda: predict(stub, "m", data, label="next")) == (
            grpc.StatusCode.NOT_FOUND, "Servable not found for request: Specific(m, 7)")
        # GetModelStatus does not look at the label (get_model_status_impl.cc): every version, newest first
        # (ServableStateMonitor's VersionMap is ordered by std::greater).
        status = status_stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
            model_spec={"name": "m", "version_label": "stable"}))
        assert [(s.version, s.state) for s in status.model_version_status] == [(2, AVAILABLE), (1, AVAILABLE)]
        # A label moved onto a version that is not available is refused; the labels served before stay.
        moved = model_server_config_pb2.ModelServerConfig()
        moved.CopyFrom(server.core.config)
        moved.model_config_list.config[0].version_labels["canary"] = 7
        code, message = rpc_error(lambda: status_stub.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=moved)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "version 7 of model m" in message
        assert predict(stub, "m", data, label="canary")[0] == 2
        moved.model_config_list.config[0].version_labels["canary"] = 1  # an available version: moved
        status_stub.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=moved))
        assert predict(stub, "m", data, label="canary")[0] == 1
    finally:
        server.stop()


def test_two_models_from_one_config_file_added_removed_and_a_bad_file_ignored(exports, tmp_path, caplog):
    models, dirs = exports
    base_a = versions_folder(tmp_path, dirs, "a", {1: 0})
    base_b = versions_folder(tmp_path, dirs, "b", {1: 1})
    config = tmp_path / "models.config"
    write_config(config, {"a": (base_a, ""), "b": (base_b, "")})
    server = start_server(model_config_file=str(config), model_config_file_poll_wait_seconds=0.1)
    try:
        stub, status_stub = stubs(server)
        data = images(2)
        for name, model in (("a", models[0]), ("b", models[1])):
            np.testing.assert_allclose(predict(stub, name, data)[1], expected(model, data)[0], atol=TOLERANCE)
        # b removed, c added (b's folder under a new name): applied without a restart.
        write_config(config, {"a": (base_a, ""), "c": (base_b, "")})
        wait_until(lambda: server.core.model_names() == ["a", "c"])
        assert rpc_error(lambda: predict(stub, "b", data)) == (
            grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(b)")
        status = status_stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "b"}))
        assert [(s.version, s.state) for s in status.model_version_status] == [(1, END)]  # as TF Serving keeps it
        np.testing.assert_allclose(predict(stub, "c", data)[1], expected(models[1], data)[0], atol=TOLERANCE)
        # Files TF Serving refuses: logged, and the served config stays.
        applied = server.core.config
        for bad in ("model_config_list { config { name: ", f'model_config_list {{ config {{ name: "a" '
                    f'base_path: "{base_a}" model_platform: "tensorflow" }} config {{ name: "a" '
                    f'base_path: "{base_b}" model_platform: "tensorflow" }} }}'):
            caplog.clear()
            atomic_write_text(str(config), bad)
            wait_until(lambda: any(str(config) in r.getMessage() for r in caplog.records))
            assert server.core.config == applied and server.core.model_names() == ["a", "c"]
            assert predict(stub, "a", data)[0] == 1
        # HandleReloadConfigRequest replaces the whole config, as TF Serving's.
        reload = model_management_pb2.ReloadConfigRequest()
        text_format.Parse(f'model_config_list {{ config {{ name: "b" base_path: "{base_b}" '
                          f'model_platform: "tensorflow" }} }}', reload.config)
        assert status_stub.HandleReloadConfigRequest(reload).status.error_code == 0
        assert server.core.model_names() == ["b"]
        assert predict(stub, "b", data)[0] == 1
        custom = model_management_pb2.ReloadConfigRequest()
        custom.config.custom_model_config.Pack(model_server_config_pb2.ModelServerConfig())
        assert rpc_error(lambda: status_stub.HandleReloadConfigRequest(custom))[0] == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()


def test_serve_with_a_bad_config_file_says_which_and_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.config"
    assert cli_main(["serve", "--model-config-file", str(missing), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"patchnet serve: error: {missing}: cannot read (No such file or directory)")
    junk = tmp_path / "junk.config"
    junk.write_text("model_config_list { config { nme: 1 } }")
    assert cli_main(["serve", "--model-config-file", str(junk), "--port", "0"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"patchnet serve: error: {junk}: not a ModelServerConfig:") and "nme" in line
    relative = tmp_path / "relative.config"
    relative.write_text('model_config_list { config { name: "m" base_path: "models/m" model_platform: "tensorflow" } }')
    assert cli_main(["serve", "--model-config-file", str(relative), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"patchnet serve: error: {relative}: INVALID_ARGUMENT: Expected model m to have an absolute path or URI; "
        "got base_path()=models/m")
    with pytest.raises(SystemExit) as exit:
        cli_main(["serve", str(tmp_path), "--max-message-bytes", "0"])
    assert exit.value.code == 2
    assert "expected a byte count from 1 to 2147483647" in capsys.readouterr().err


def test_push_written_models_config_served_with_models_dir(exports, tmp_path):
    """`patchnet push` writes base_path /models/NAME (the compose mount); --models-dir maps it here."""
    models, dirs = exports
    copy_version(dirs[0], str(tmp_path / "patchnet"), 1)
    config = tmp_path / "models.config"
    write_config(config, {"patchnet": ("/models/patchnet", "")})
    server = start_server(model_config_file=str(config), models_dir=str(tmp_path))
    try:
        stub, _ = stubs(server)
        data = images(1)
        np.testing.assert_allclose(predict(stub, "patchnet", data)[1], expected(models[0], data)[0], atol=TOLERANCE)
    finally:
        server.stop()


def test_message_cap_is_tf_servings_int32_max_unless_set(exports, tmp_path):
    _, dirs = exports
    base = versions_folder(tmp_path, dirs, "m", {1: 0})
    junk = np.random.default_rng(0).bytes(5 << 20)  # above gRPC's 4 MiB default
    for cap, code in ((None, grpc.StatusCode.INVALID_ARGUMENT), (1 << 20, grpc.StatusCode.RESOURCE_EXHAUSTED)):
        options = {} if cap is None else {"max_message_bytes": cap}
        server = start_server(str(base), "m", **options)
        channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)])
        try:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            got, message = rpc_error(lambda: stub.Predict(  # noqa: B023 (called at once)
                request(inputs={"image_bytes": tf.make_tensor_proto([junk], tf.string)}, model="m"), timeout=60))
            assert got == code, message
            if cap is None:  # reached the graph: TF Serving's answer to junk bytes
                assert "not a JPEG, PNG, GIF or BMP image" in message
        finally:
            channel.close()
            server.stop()
