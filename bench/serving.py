"""Serving benchmark: classify and heatmap over gRPC and REST, batching off and on, against in-process.

    python -m bench.serving            # the paper's subnet (p = 21, 7 x 64 convs), 128 x 128 PNGs
    python -m bench.serving --quick    # a small subnet and 64 x 64 PNGs; about a minute

The default run takes about 40 minutes; `--clients 16` about 15.

One image per request. For each signature and 1, 4 and 16 concurrent
clients, five paths call the same exported SavedModel: in-process
(`serving.loader.LoadedModel.run` from as many threads, the reference),
and the local server over gRPC and over REST, once without batching and
once with `--enable_batching` and `serving/batching.config` (up to 16
images per session run, no batching window, 2 batch threads). Each client opens its
own channel or keep-alive HTTP connection and sends requests back to back;
each block measures `--seconds` of steady state (after every client has
had its first answer); blocks of the five paths are interleaved so load
changes on the shared machine hit all of them. Reports p50 / p99 latency,
requests/s, and each path's ratios to in-process in the same cell, each batching path's requests/s
against the same transport unbatched, and this process's CPU time per request (servers and clients
run in it): on a machine shared with other jobs, requests/s follows how many threads a path keeps
runnable, CPU time does not. `--clients 16` measures one column.

A second table is the ceiling of what batching can save: CPU time per image
of one in-process `classify` run of B images, for B = 1 to 16. Writes
bench/results/serving[_quick].json.
"""

import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import shutil
import tempfile
import threading
import time

os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")  # TensorFlow as `patchnet serve` starts it

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
from serving.batching import read_batching_parameters
from serving.client import MAX_MESSAGE, build_request
from serving.loader import LoadedModel
from serving.server import start_server

SIGNATURES = ("classify", "heatmap")
CLIENTS = (1, 4, 16)
PATHS = ("in-process", "gRPC", "REST", "gRPC batching", "REST batching")
BATCHING_CONFIG = "serving/batching.config"


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1e3, q))


def in_process_client(model, data, signature):
    feed = {"image_bytes": np.array([data], dtype=object)}

    def call():
        return model.run(signature, feed)["probability"]

    return call, lambda: None


def grpc_client(address, data, signature):
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = build_request("patchnet", [data], signature)

    def call():
        return tf.make_ndarray(stub.Predict(request, timeout=300).outputs["probability"])

    return call, channel.close


def rest_client(port, data, signature):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)  # keep-alive, one per client
    body = json.dumps({"signature_name": signature,
                       "instances": [{"image_bytes": {"b64": base64.b64encode(data).decode()}}]})
    headers = {"Content-Type": "application/json"}

    def call():
        connection.request("POST", "/v1/models/patchnet:predict", body, headers)
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"REST {response.status}: {answer}")
        return np.array([row["probability"] for row in answer["predictions"]], np.float32)

    return call, connection.close


def run_block(make_client, clients, seconds):
    """Steady-state latencies (s), requests/s and CPU seconds of this process per request, of `clients`
    threads calling back to back.

    The window opens once every client has had an answer (the start-up wave is over) and lasts `seconds`;
    requests/s counts the answers inside it, CPU time is read at its two ends, latencies are those of the
    requests that started and ended inside it. Counting from the first call to the last answer instead
    measured the ramp and the drain: with 16 clients and answers a second apart, a short block is mostly
    both, and batching's last, part-filled batch weighed as much as the steady state."""
    answers, lock = [], threading.Lock()  # (began, ended) of every call
    first_answers = [0]
    opened = threading.Event()  # every client has had an answer: the window opens
    stop = threading.Event()
    window = {}

    def client():
        # No client waits for the others: an idle keep-alive connection is closed by the server (uvicorn
        # after 5 s), and a heatmap's start-up wave of 16 clients lasts longer than that.
        call, close = make_client()
        try:
            call()  # this connection's first call (channel setup) is not measured
            first = True
            while not stop.is_set():
                began = time.perf_counter()
                call()
                ended = time.perf_counter()
                with lock:
                    answers.append((began, ended))
                    if first:
                        first = False
                        first_answers[0] += 1
                        if first_answers[0] == clients:
                            opened.set()
        except BaseException:
            stop.set()
            opened.set()  # the caller must not wait for this client forever
            raise
        finally:
            close()

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client) for _ in range(clients)]
        opened.wait()
        window["start"], cpu_start = time.perf_counter(), time.process_time()
        stop.wait(seconds)  # returns early only when a client failed
        window["end"], cpu = time.perf_counter(), time.process_time() - cpu_start
        stop.set()
        for future in futures:
            future.result()  # raises a client's error
    inside = [ended - began for began, ended in answers if window["start"] <= ended < window["end"]]
    latencies = [ended - began for began, ended in answers
                 if began >= window["start"] and ended < window["end"]]
    return latencies, len(inside) / seconds, cpu / max(len(inside), 1)


def cpu_per_image_by_batch(model, data, sizes=(1, 2, 4, 8, 16), images=48):
    """CPU ms per image of one `classify` run of B images, one run at a time: the most a merged run can save."""
    rows = []
    for size in sizes:
        feed = {"image_bytes": np.array([data] * size, dtype=object)}
        model.run("classify", feed)
        runs = max(2, images // size)
        start = time.process_time()
        for _ in range(runs):
            model.run("classify", feed)
        rows.append({"batch": size, "cpu_ms_per_image": (time.process_time() - start) / (runs * size) * 1e3})
    for row in rows:
        row["vs_batch_1"] = rows[0]["cpu_ms_per_image"] / row["cpu_ms_per_image"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subnet and images; about a minute and a half")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds measured per block, after the start-up wave (default: classify 8, "
                        "heatmap 20; quick: 3 and 6)")
    parser.add_argument("--blocks", type=int, default=2, help="interleaved blocks per path and cell")
    parser.add_argument("--clients", default=",".join(map(str, CLIENTS)),
                        help="concurrent clients per cell, comma-separated (default 1,4,16)")
    args = parser.parse_args()
    quick = args.quick
    client_counts = [int(count) for count in args.clients.split(",")]
    size, filters, layers, stride = (64, 16, 3, 4) if quick else (128, 64, 7, 7)
    seconds = {"classify": args.seconds or (3 if quick else 8), "heatmap": args.seconds or (6 if quick else 20)}
    keras.utils.set_random_seed(0)
    model = build_patchnet(21, filters=filters, conv_layers=layers)
    preprocessing = Preprocessing(image_size=(size, size))
    batching = read_batching_parameters(BATCHING_CONFIG)
    root = tempfile.mkdtemp(prefix="bench-serving-")
    servers = {}
    try:
        export_dir = write_saved_model(model, preprocessing, f"{root}/export", heatmap_stride=stride)
        copy_version(export_dir, f"{root}/models/patchnet", 1)
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        data = cv2.imencode(".png", image)[1].tobytes()
        local = LoadedModel(export_dir)
        for name, options in (("plain", None), ("batching", batching)):
            servers[name] = start_server(f"{root}/models/patchnet", "patchnet", port=0, workers=32,
                                         rest_api_port=0, batching=options)
            servers[name].wait_for_version(1)
        factories = {
            "in-process": lambda signature: lambda: in_process_client(local, data, signature),
            "gRPC": lambda signature: lambda: grpc_client(servers["plain"].address, data, signature),
            "REST": lambda signature: lambda: rest_client(servers["plain"].rest_port, data, signature),
            "gRPC batching": lambda signature: lambda: grpc_client(servers["batching"].address, data, signature),
            "REST batching": lambda signature: lambda: rest_client(servers["batching"].rest_port, data, signature),
        }
        for signature in SIGNATURES:  # warm up every path, and check they all answer the same
            want = in_process_client(local, data, signature)[0]()
            for path in PATHS:
                call, close = factories[path](signature)()
                for _ in range(3):
                    np.testing.assert_allclose(call(), want, atol=1e-5)
                close()

        cells = {}
        for signature in SIGNATURES:
            for clients in client_counts:
                measured = {path: {"latency": [], "rates": [], "cpu": []} for path in PATHS}
                stats_before = servers["batching"].batcher.stats()
                for _ in range(args.blocks):
                    for path in PATHS:
                        latency, rate, cpu = run_block(factories[path](signature), clients, seconds[signature])
                        measured[path]["latency"] += latency
                        measured[path]["rates"].append(rate)
                        measured[path]["cpu"].append(cpu)
                stats_after = servers["batching"].batcher.stats()
                batches = stats_after["batches"] - stats_before["batches"]
                measured["requests_per_batch"] = (
                    (stats_after["requests"] - stats_before["requests"]) / batches if batches else 0.0)
                cells[(signature, clients)] = measured
                print(f"  {signature}, {clients} clients: done", flush=True)
        batch_costs = cpu_per_image_by_batch(local, data)
        local.close()
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    for (signature, clients), measured in cells.items():
        reference = measured["in-process"]
        base_p50 = percentile(reference["latency"], 50)
        base_rate = float(np.median(reference["rates"]))
        unbatched_rates = {path: float(np.median(measured[path.replace(" batching", "")]["rates"])) for path in PATHS}
        for path in PATHS:
            latency, rates = measured[path]["latency"], measured[path]["rates"]
            rate = float(np.median(rates))
            rows.append({
                "signature": signature, "clients": clients, "path": path, "requests": len(latency),
                "p50_ms": percentile(latency, 50), "p99_ms": percentile(latency, 99), "rps": rate,
                "p50_vs_in_process": percentile(latency, 50) / base_p50, "rps_vs_in_process": rate / base_rate,
                "requests_per_batch": measured["requests_per_batch"] if "batching" in path else "",
                "rps_vs_unbatched": rate / unbatched_rates[path] if "batching" in path else "",
                "cpu_ms_per_request": float(np.median(measured[path]["cpu"])) * 1e3,
            })
    print_table(
        f"bench.serving ({'quick' if quick else 'default'}): 1 PNG of {size}x{size} per request, subnet p=21 "
        f"{layers}x{filters}, heatmap stride {stride}; {args.blocks} interleaved blocks per path of "
        f"{seconds['classify']:g} s (classify) and {seconds['heatmap']:g} s (heatmap) after the start-up wave; "
        f"batching: {BATCHING_CONFIG}",
        rows,
        [("signature", "signature"), ("clients", "clients"), ("path", "path"), ("requests", "requests"),
         ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("rps", "req/s"),
         ("p50_vs_in_process", "p50 / in-process"), ("rps_vs_in_process", "req/s / in-process"),
         ("requests_per_batch", "requests per batch"), ("rps_vs_unbatched", "req/s / unbatched"),
         ("cpu_ms_per_request", "CPU ms / request")],
    )
    print_table("classify, one in-process run of B images at a time: CPU per image", batch_costs,
                [("batch", "B"), ("cpu_ms_per_image", "CPU ms / image"), ("vs_batch_1", "batch 1 / this")])
    write_json("serving_quick" if quick else "serving", {
        "environment": environment(), "quick": quick, "image_size": size, "filters": filters,
        "conv_layers": layers, "heatmap_stride": stride, "seconds_per_block": seconds, "blocks": args.blocks,
        "batching": batching.__dict__ | {"allowed_batch_sizes": list(batching.allowed_batch_sizes)},
        "rows": rows, "cpu_per_image_by_batch": batch_costs,
    })


if __name__ == "__main__":
    main()
