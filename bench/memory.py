"""Memory after bursts: the RSS of `patchnet serve` before, right after, and a few seconds after large requests.

    python -m bench.memory          # about 2 minutes on 2 shared cores
    python -m bench.memory --all    # also MALLOC_ARENA_MAX=2 and the trim on oneDNN's pool; about 3 minutes

Two bursts, as the issue measured them: one gRPC request of 4096 PNGs (128 x 128, `classify` of a
small subnet at 64 x 64 input), then 300 MiB of junk bytes in one request (refused with
INVALID_ARGUMENT). One server after the other, the same export and requests: the server as it was
(oneDNN's own BFC allocator, TensorFlow's default, TF_ONEDNN_USE_SYSTEM_ALLOCATOR=0; no malloc_trim,
PATCHNET_MALLOC_TRIM=0), then with malloc for oneDNN (what `patchnet serve` sets) without and with
serving/memory.py's trim (the default); --all adds the BFC server with MALLOC_ARENA_MAX=2 and with
the trim. RSS is read from /proc/PID/status of the server process. Prints a table,
writes bench/results/memory.json.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import cv2
import grpc
import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from bench.common import environment, print_table, write_json
from patchnet_tf import build_patchnet
from patchnet_tf.preprocessing import Preprocessing
from pipelines.export import write_saved_model
from pipelines.push import copy_version
from serving.client import build_request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = 4096
JUNK_MIB = 300
SETTLE_SECONDS = 2.0  # serving/memory.py's follow-up trim comes 1 s after the request
MODES = {  # name: extra environment of the server
    "BFC, trim off (as before)": {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "0", "PATCHNET_MALLOC_TRIM": "0"},
    "malloc, trim off": {"PATCHNET_MALLOC_TRIM": "0"},
    "malloc, trim on (default)": {},
}
MORE_MODES = {
    "BFC, trim off, MALLOC_ARENA_MAX=2": {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "0", "PATCHNET_MALLOC_TRIM": "0",
                                          "MALLOC_ARENA_MAX": "2"},
    "BFC, trim on": {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "0"},
}


def server_rss_mib(pid):
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(base, env):
    process = subprocess.Popen(
        [sys.executable, "-m", "patchnet_launcher", "serve", base, "--port", "0"],  # as the `patchnet` script
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env,
                 PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])))
    line = process.stdout.readline()
    if not line.startswith("serving model"):
        process.kill()
        raise RuntimeError(f"patchnet serve did not start: {line!r}")
    return process, line.split(" on ")[1].split(";")[0].strip()


def measure(base, env, images, junk):
    process, address = start_server(base, env)
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 2**31 - 1),
                                                      ("grpc.max_receive_message_length", 2**31 - 1)])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    try:
        stub.Predict(build_request("patchnet", images[:4], "classify"), timeout=120)  # warm the graph
        row = {"start_mib": server_rss_mib(process.pid)}
        begin = time.perf_counter()
        answer = stub.Predict(build_request("patchnet", images, "classify"), timeout=600)
        row["burst_seconds"] = time.perf_counter() - begin
        assert len(tf.make_ndarray(answer.outputs["probability"])) == len(images)
        row["after_images_mib"] = server_rss_mib(process.pid)
        time.sleep(SETTLE_SECONDS)
        row["settled_images_mib"] = server_rss_mib(process.pid)
        try:
            stub.Predict(build_request("patchnet", [junk], "classify"), timeout=600)
            raise RuntimeError("the junk request was answered")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        row["after_junk_mib"] = server_rss_mib(process.pid)
        time.sleep(SETTLE_SECONDS)
        row["settled_junk_mib"] = server_rss_mib(process.pid)
        return row
    finally:
        channel.close()
        process.terminate()
        process.wait(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also the two diagnostic servers")
    args = parser.parse_args()
    modes = MODES | (MORE_MODES if args.all else {})
    os.nice(15)  # the machine is shared; the servers it starts inherit this
    keras.utils.set_random_seed(0)
    size, input_size = 128, 64
    root = tempfile.mkdtemp(prefix="bench-memory-")
    try:
        export_dir = write_saved_model(build_patchnet(9, filters=8, conv_layers=2),
                                       Preprocessing(image_size=(input_size, input_size)), f"{root}/export")
        base = f"{root}/models/patchnet"
        copy_version(export_dir, base, 1)
        rng = np.random.default_rng(0)
        images = [cv2.imencode(".png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))[1].tobytes()
                  for _ in range(16)] * (IMAGES // 16)
        junk = b"\0" * (JUNK_MIB * 2**20)
        rows = []
        for mode, env in modes.items():
            rows.append({"mode": mode, **measure(base, env, images, junk)})
            print(f"  {mode}: done", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(
        f"bench.memory: server RSS (MiB) around one request of {IMAGES} PNGs of {size}x{size} (classify), "
        f"then {JUNK_MIB} MiB of junk over gRPC; settled = {SETTLE_SECONDS:g} s later",
        rows,
        [("mode", "server"), ("start_mib", "start"), ("after_images_mib", "after images"),
         ("settled_images_mib", "settled"), ("after_junk_mib", "after junk"), ("settled_junk_mib", "settled"),
         ("burst_seconds", "images request s")],
    )
    write_json("memory", {"environment": environment(), "images": IMAGES, "image_size": size,
                          "junk_mib": JUNK_MIB, "settle_seconds": SETTLE_SECONDS, "rows": rows})


if __name__ == "__main__":
    main()
