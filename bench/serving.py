"""Serving benchmark: the classify signature over gRPC (local server) against in-process.

    python -m bench.serving            # the paper's subnet (p = 21, 7 x 64 convs), 128 x 128 images
    python -m bench.serving --quick    # a small subnet and 64 x 64 images, under 2 minutes

Both sides run the same exported SavedModel through the same session-loader
path (`serving.loader.LoadedModel`), so the ratio is the cost of gRPC,
protobuf conversion and the server's request checks. Latency: one image per
request, one caller, p50 / p99. Throughput: 4 concurrent callers. Blocks of
the two are interleaved so that load changes on the shared machine hit both.
Writes bench/results/serving[_quick].json.
"""

import argparse
import concurrent.futures
import shutil
import tempfile
import time

from bench.common import environment, print_table, write_json

import cv2  # noqa: E402
import grpc  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_serving.apis import prediction_service_pb2_grpc  # noqa: E402

from patchnet_tf import build_patchnet  # noqa: E402
from patchnet_tf.preprocessing import Preprocessing  # noqa: E402
from pipelines.export import write_saved_model  # noqa: E402
from pipelines.push import copy_version  # noqa: E402
from serving.client import build_request  # noqa: E402
from serving.loader import LoadedModel  # noqa: E402
from serving.server import start_server  # noqa: E402

CONCURRENCY = 4


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q))


def sequential(call, count):
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def concurrent_rate(call, count):
    """Requests/s with CONCURRENCY callers sharing `count` requests."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda _: call(), range(count)))
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subnet; under 2 minutes")
    args = parser.parse_args()
    quick = args.quick
    size, filters, layers, requests, blocks = (64, 16, 3, 60, 2) if quick else (128, 64, 7, 30, 2)
    keras.utils.set_random_seed(0)
    model = build_patchnet(21, filters=filters, conv_layers=layers)
    preprocessing = Preprocessing(image_size=(size, size))
    root = tempfile.mkdtemp(prefix="bench-serving-")
    server = None
    try:
        export_dir = write_saved_model(model, preprocessing, f"{root}/export", heatmap_stride=7)
        copy_version(export_dir, f"{root}/models/patchnet", 1)
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        data = cv2.imencode(".png", image)[1].tobytes()

        local = LoadedModel(export_dir)
        feed = {"image_bytes": np.array([data], dtype=object)}
        in_process = lambda: local.run("classify", feed)  # noqa: E731

        server = start_server(f"{root}/models/patchnet", "patchnet", port=0, workers=CONCURRENCY * 2)
        server.wait_for_version(1)
        channel = grpc.insecure_channel(server.address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = build_request("patchnet", [data], "classify")
        over_grpc = lambda: stub.Predict(request, timeout=60)  # noqa: E731

        for call in (in_process, over_grpc):  # warm up: first runs, oneDNN setup, channel
            for _ in range(5):
                call()
        assert np.allclose(tf.make_ndarray(over_grpc().outputs["probability"]),
                           in_process()["probability"], atol=1e-6)

        latency = {"in-process": [], "gRPC": []}
        rates = {"in-process": [], "gRPC": []}
        for _ in range(blocks):
            for name, call in (("in-process", in_process), ("gRPC", over_grpc)):
                latency[name] += sequential(call, requests)
                rates[name].append(concurrent_rate(call, requests))
        channel.close()
        local.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    for name in ("in-process", "gRPC"):
        rows.append({
            "path": name,
            "p50_ms": percentile(latency[name], 50),
            "p99_ms": percentile(latency[name], 99),
            "sequential_rps": 1.0 / float(np.mean(latency[name])),
            "concurrent_rps": float(np.median(rates[name])),
        })
    base, remote = rows
    ratios = {
        "p50_grpc_over_in_process": remote["p50_ms"] / base["p50_ms"],
        "p99_grpc_over_in_process": remote["p99_ms"] / base["p99_ms"],
        "throughput_grpc_over_in_process": remote["concurrent_rps"] / base["concurrent_rps"],
        "grpc_overhead_p50_ms": remote["p50_ms"] - base["p50_ms"],
    }
    print_table(
        f"bench.serving ({'quick' if quick else 'default'}): classify, 1 PNG of {size}x{size} per request, "
        f"subnet p=21 {layers}x{filters}; {len(latency['gRPC'])} sequential requests per path, "
        f"throughput with {CONCURRENCY} callers",
        rows,
        [("path", "path"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
         ("sequential_rps", "req/s (1 caller)"), ("concurrent_rps", f"req/s ({CONCURRENCY} callers)")],
    )
    print_table("same-run ratios", [{"measure": k, "value": v} for k, v in ratios.items()],
                [("measure", "measure"), ("value", "value")])
    write_json("serving_quick" if quick else "serving", {
        "environment": environment(), "quick": quick, "image_size": size, "filters": filters,
        "conv_layers": layers, "concurrency": CONCURRENCY, "rows": rows, "ratios": ratios,
        "latency_s": latency,
    })


if __name__ == "__main__":
    main()
