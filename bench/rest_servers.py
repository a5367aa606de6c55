"""REST front ends compared: the standard library's http.server (serving/rest.py before uvicorn,
taken from git) against uvicorn + Starlette, on the same ServerCore in the same run.

    python -m bench.rest_servers                 # about a minute and a half on 2 cores
    python -m bench.rest_servers --seconds 2     # longer blocks

Two calls per path: `GET /v1/models/patchnet` (status: HTTP and JSON only, no model run) and
`:predict` on the `classify` signature of a small subnet (p = 21, 3 x 16 convs, one 64 x 64 PNG
per request). 1, 4 and 16 clients, each with its own keep-alive connection (http.client); blocks
of the two servers interleaved. Prints a table and writes bench/results/rest_servers.json.
"""

import argparse
import http.client
import importlib.util
import os
import shutil
import subprocess
import tempfile

import cv2
import keras
import numpy as np

from bench.common import environment, print_table, write_json
from bench.serving import percentile, rest_client, run_block
from patchnet_tf import build_patchnet
from patchnet_tf.preprocessing import Preprocessing
from pipelines.export import write_saved_model
from pipelines.push import copy_version
from serving import handlers
from serving.server import start_server

OLD_COMMIT = "25f99a4"  # the last commit with the http.server front end
CLIENTS = (1, 4, 16)
CALLS = ("status", "classify")
SERVERS = ("http.server", "uvicorn + Starlette")


def old_rest_module():
    """serving/rest.py as of OLD_COMMIT, loaded under another name, answering through today's handlers."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:serving/rest.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("old_rest", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{OLD_COMMIT}:serving/rest.py", "exec"), module.__dict__)
    module.handlers = handlers  # it called serving.server's predict & co., which moved to serving.handlers
    return module


def status_client(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def call():
        connection.request("GET", "/v1/models/patchnet")
        response = connection.getresponse()
        text = response.read()
        if response.status != 200:
            raise RuntimeError(f"REST {response.status}: {text}")

    return call, connection.close


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per block")
    parser.add_argument("--blocks", type=int, default=2, help="interleaved blocks per server and cell")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    model = build_patchnet(21, filters=16, conv_layers=3)
    root = tempfile.mkdtemp(prefix="bench-rest-")
    server = old = None
    try:
        export_dir = write_saved_model(model, Preprocessing(image_size=(64, 64)), f"{root}/export", heatmap_stride=4)
        copy_version(export_dir, f"{root}/models/patchnet", 1)
        image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        data = cv2.imencode(".png", image)[1].tobytes()
        server = start_server(f"{root}/models/patchnet", "patchnet", port=0, workers=32, rest_api_port=0)
        server.wait_for_version(1)
        old = old_rest_module().RestServer(server.core, "127.0.0.1", 0)
        old.start()
        ports = {"http.server": old.port, "uvicorn + Starlette": server.rest_port}
        factories = {
            "status": lambda port: lambda: status_client(port),
            "classify": lambda port: lambda: rest_client(port, data, "classify"),
        }
        for name in SERVERS:  # warm up; both must answer the same
            answers = []
            for _ in range(3):
                call, close = factories["classify"](ports[name])()
                answers.append(call())
                close()
            np.testing.assert_allclose(answers[0], answers[-1])
        rows = []
        for call_name in CALLS:
            for clients in CLIENTS:
                measured = {name: {"latency": [], "rates": []} for name in SERVERS}
                for _ in range(args.blocks):
                    for name in SERVERS:
                        latency, rate = run_block(factories[call_name](ports[name]), clients, args.seconds,
                                                  minimum=clients)
                        measured[name]["latency"] += latency
                        measured[name]["rates"].append(rate)
                base = float(np.median(measured["http.server"]["rates"]))
                for name in SERVERS:
                    latency, rate = measured[name]["latency"], float(np.median(measured[name]["rates"]))
                    rows.append({"call": call_name, "clients": clients, "server": name, "requests": len(latency),
                                 "p50_ms": percentile(latency, 50), "p99_ms": percentile(latency, 99),
                                 "rps": rate, "rps_vs_http_server": rate / base})
                print(f"  {call_name}, {clients} clients: done", flush=True)
    finally:
        if old is not None:
            old.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    print_table(
        f"bench.rest_servers: {args.blocks} interleaved blocks of {args.seconds:g} s per server and cell; "
        "classify: one 64x64 PNG, subnet p=21 3x16",
        rows,
        [("call", "call"), ("clients", "clients"), ("server", "server"), ("requests", "requests"),
         ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("rps", "req/s"), ("rps_vs_http_server", "req/s / http.server")],
    )
    write_json("rest_servers", {"environment": environment(), "seconds_per_block": args.seconds,
                                "blocks": args.blocks, "old_commit": OLD_COMMIT, "rows": rows})


if __name__ == "__main__":
    main()
