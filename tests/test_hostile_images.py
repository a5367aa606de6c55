"""Decompression bombs: the exported graph refuses them from their headers, before decoding (pipelines/export.py);
and the server's memory after a burst of large requests (serving/memory.py).

A tiny model is exported with a low limit (100 x 100 pixels per image, 25,000 per request), so the
images that cross it are a few KiB; the bombs are real PNGs of 8192 x 8192 zeros (64 KiB each) that
would take about 1 GB to decode. Everything goes over gRPC to the local server running in this
process, whose peak RSS is read from /proc (VmHWM, reset through clear_refs).
"""

import gc
import struct
import time
import zlib

import cv2
import grpc
import numpy as np
import pytest
import tensorflow as tf
from test_serving import MODEL, PREPROCESSING, outputs, request, tiny_model

from patchnet_tf import build_patchnet
from patchnet_tf.cli import main as cli_main
from patchnet_tf.preprocessing import Preprocessing, encoded_image_size
from pipelines.export import write_saved_model
from pipelines.push import copy_version
from serving import client, memory
from serving.loader import LoadedModel
from serving.server import start_server

MAX_IMAGE_PIXELS = 100 * 100
MAX_REQUEST_PIXELS = 25_000
BOMB_SIDE = 8192
# Decoding one bomb costs 8192^2 x (3 bytes uint8 + 12 bytes float32) = 960 MiB; refusing it costs nothing.
PEAK_RSS_GROWTH_MIB = 150
BURST_IMAGES = 2048
JUNK_BYTES = 256 * 2**20
RETAINED_AFTER_BURST_MIB = 100


def png_bomb(width, height):
    """A valid grey PNG of zeros, streamed through zlib so that building it needs no image in memory."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + width)  # filter type 0, then the row's pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encode(width, height, extension):
    ok, data = cv2.imencode(extension, np.full((height, width, 3), 128, np.uint8))
    assert ok
    return data.tobytes()


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # resets VmHWM to the current RSS


def rss_mib(field):
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    export_dir = write_saved_model(tiny_model(0), PREPROCESSING, str(root / "export"),
                                   max_image_pixels=MAX_IMAGE_PIXELS, max_request_pixels=MAX_REQUEST_PIXELS)
    copy_version(export_dir, str(root / MODEL), 1)
    server = start_server(str(root / MODEL), MODEL, port=0, poll_seconds=0.2)
    server.wait_for_version(1)
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 2**26)])
    stub = client.prediction_service_pb2_grpc.PredictionServiceStub(channel)
    yield stub
    channel.close()
    server.stop()


def predict(stub, image_bytes):
    proto = tf.make_tensor_proto(image_bytes, tf.string)
    return outputs(stub.Predict(request("classify", {"image_bytes": proto}), timeout=120))


def refusal(stub, image_bytes):
    with pytest.raises(grpc.RpcError) as error:
        predict(stub, image_bytes)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return error.value.details()


def test_the_header_gives_each_formats_size_without_decoding():
    formats = [encode(37, 21, extension) for extension in (".png", ".jpg", ".bmp", ".gif")]
    top_down_bmp = bytearray(formats[2])
    top_down_bmp[22:26] = struct.pack("<i", -21)  # a negative height: rows stored top to bottom
    sizes = encoded_image_size(tf.constant(formats + [bytes(top_down_bmp), png_bomb(BOMB_SIDE, 3), b"junk"]))
    assert sizes.numpy().tolist() == [[37, 21]] * 5 + [[BOMB_SIDE, 3], [0, 0]]
    assert tf.io.decode_image(bytes(top_down_bmp)).shape == (21, 37, 3)  # the decoder reads it the same way


@pytest.mark.parametrize("extension", [".png", ".jpg", ".bmp", ".gif"])
def test_an_image_just_over_the_limit_is_refused_naming_its_size_and_the_limit(served, extension):
    under = predict(served, [encode(100, 100, extension)])
    assert under["probability"].shape == (1,)
    message = refusal(served, [encode(100, 100, extension), encode(101, 100, extension)])
    assert ("image_bytes: image 1 of the batch is 101x100 pixels (10100), "
            "over the limit of 10000 pixels per image") in message


def test_bombs_in_one_request_are_refused_before_any_is_decoded(served):
    bomb = png_bomb(BOMB_SIDE, BOMB_SIDE)
    assert len(bomb) < 70_000
    good = encode(64, 48, ".png")
    want = predict(served, [good])["probability"]
    reset_peak_rss()
    before = rss_mib("VmRSS")
    message = refusal(served, [good, bomb, bomb, bomb])
    assert (f"image_bytes: image 1 of the batch is {BOMB_SIDE}x{BOMB_SIDE} pixels ({BOMB_SIDE ** 2}), "
            f"over the limit of {MAX_IMAGE_PIXELS} pixels per image") in message
    np.testing.assert_allclose(predict(served, [good])["probability"], want, atol=1e-6)
    growth = rss_mib("VmHWM") - before
    print(f"peak RSS {rss_mib('VmHWM'):.0f} MiB, {growth:+.1f} MiB while refusing 3 bombs")
    assert growth < PEAK_RSS_GROWTH_MIB, f"peak RSS grew {growth:.0f} MiB while refusing 3 bombs"


def test_a_request_over_the_request_limit_is_refused_though_each_image_is_under_its_own(served):
    image = encode(100, 100, ".png")
    assert predict(served, [image, image])["probability"].shape == (2,)
    message = refusal(served, [image, image, image])
    assert ("image_bytes: the 3 images of the request hold 30000 pixels, "
            "over the limit of 25000 pixels per request") in message


def test_truncated_headers_get_libpng_and_libjpeg_messages_not_a_size(served):
    png = encode(100, 100, ".png")
    # Width in the header, height cut off: read as 0 x 0, so the decoder refuses it in its own words.
    assert refusal(served, [png[:20]]) == "image_bytes: Invalid PNG. Failed to initialize decoder."
    jpeg = encode(100, 100, ".jpg")  # libjpeg's header parser (the decoder's) refuses it
    assert refusal(served, [jpeg[:50]]) == "image_bytes: Invalid JPEG data, size 50"
    assert "image_bytes: not a JPEG, PNG, GIF or BMP image" in refusal(served, [b"\x89PN"])
    assert predict(served, [png])["probability"].shape == (1,)


def test_export_bakes_the_flags_into_the_graph_and_refuses_a_request_limit_below_the_image_limit(
        tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    tiny_model(0).save(run / "model.keras")
    PREPROCESSING.save(str(run))
    assert cli_main(["export", str(run), "--out", str(tmp_path / "bad"),
                     "--max-image-pixels", "500", "--max-request-pixels", "499"]) == 2
    assert "--max-request-pixels 499 is below --max-image-pixels 500" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert cli_main(["export", str(run), "--out", str(tmp_path / "export"),
                     "--max-image-pixels", "500", "--max-request-pixels", "1000"]) == 0
    model = LoadedModel(str(tmp_path / "export"))
    try:
        assert model.run("classify", {"image_bytes": np.array([encode(25, 20, ".png")], object)})
        with pytest.raises(tf.errors.InvalidArgumentError, match="26x20 pixels .520., over the limit of 500"):
            model.run("classify", {"image_bytes": np.array([encode(26, 20, ".png")], object)})
        with pytest.raises(tf.errors.InvalidArgumentError, match="hold 1500 pixels, over the limit of 1000"):
            model.run("heatmap", {"image_bytes": np.array([encode(25, 20, ".jpg")] * 3, object)})
    finally:
        model.close()


def test_the_memory_of_a_burst_is_given_back(tmp_path):
    """One request of 2048 PNGs, then 256 MiB of junk, take the process's RSS up by over a GiB; a moment
    later it is back within RETAINED_AFTER_BURST_MIB of where it was (malloc's arenas keep more)."""
    export_dir = write_saved_model(build_patchnet(9, filters=8, conv_layers=2), Preprocessing(image_size=(64, 64)),
                                   str(tmp_path / "export"))
    copy_version(export_dir, str(tmp_path / MODEL), 1)
    server = start_server(str(tmp_path / MODEL), MODEL, port=0, poll_seconds=0.2)
    channel = grpc.insecure_channel(server.address)
    try:
        server.wait_for_version(1)
        stub = client.prediction_service_pb2_grpc.PredictionServiceStub(channel)
        rng = np.random.default_rng(0)
        pngs = [cv2.imencode(".png", rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))[1].tobytes()
                for _ in range(16)]
        predict(stub, pngs[:4])
        time.sleep(memory.FOLLOW_UP_SECONDS + 0.5)  # any trim the warm-up request started is over
        before = rss_mib("VmRSS")
        reset_peak_rss()
        assert predict(stub, pngs * (BURST_IMAGES // 16))["probability"].shape == (BURST_IMAGES,)
        assert "not a JPEG, PNG, GIF or BMP image" in refusal(stub, [b"\0" * JUNK_BYTES])
        gc.collect()  # the client's copies of the junk, held by the refusal's traceback cycle, not the server's
        peak = rss_mib("VmHWM")
        assert peak - before > 2 * RETAINED_AFTER_BURST_MIB  # a burst the bound below can tell from none
        time.sleep(memory.FOLLOW_UP_SECONDS + 0.5)
        retained = rss_mib("VmRSS") - before
        print(f"RSS {before:.0f} MiB, peak {peak:.0f}, {retained:+.0f} MiB a moment after the burst")
        assert retained < RETAINED_AFTER_BURST_MIB, f"{retained:.0f} MiB still held after the burst"
        assert predict(stub, pngs[:1])["probability"].shape == (1,)
    finally:
        channel.close()
        server.stop()
