"""Restart benchmark: kill -9 of `patchnet serve` under load, then a restart; seconds to the first answer.

    python -m bench.serving_restart            # the paper's subnet (p = 21, 7 x 64), 128 x 128, warmup records
    python -m bench.serving_restart --quick    # a small subnet and 64 x 64 images

Two clients call `patchnet predict`'s code (serving.client.predict: waits for the
server, retries UNAVAILABLE with backoff) in a loop. The server process is
killed with SIGKILL and started again on the same port; measured from the
restart: when the new process listens (it binds first, prints its "serving"
line once the model is loaded and warmed up) and when each client gets its
first answer. The same-run reference is loading and warming up the same
version in this process (`LoadedModel` + the warmup replay), so the ratio is
the cost of a new process (Python and TensorFlow imports, gRPC) on top of the
model load. Writes bench/results/serving_restart[_quick].json.
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import cv2
import keras
import numpy as np

from bench.common import environment, print_table, write_json
from patchnet_tf import build_patchnet
from patchnet_tf.errors import PatchNetError
from patchnet_tf.preprocessing import Preprocessing
from pipelines.export import write_saved_model
from pipelines.push import copy_version
from serving import client, warmup
from serving.loader import LoadedModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENTS = 2


def start_serve(base, port):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "patchnet_tf", "serve", base, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def wait_for_line(process):
    line = process.stdout.readline()
    if not line.startswith("serving model"):
        raise RuntimeError(f"patchnet serve did not start: {line!r}")
    return time.monotonic()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subnet; about a minute")
    parser.add_argument("--restarts", type=int, default=3)
    args = parser.parse_args()
    quick = args.quick
    size, filters, layers = (64, 16, 3) if quick else (128, 64, 7)
    keras.utils.set_random_seed(0)
    model = build_patchnet(21, filters=filters, conv_layers=layers)
    root = tempfile.mkdtemp(prefix="bench-restart-")
    process = None
    stop = threading.Event()
    answers = [[] for _ in range(CLIENTS)]  # (time.monotonic(), ok)
    threads = []
    try:
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        data = cv2.imencode(".png", image)[1].tobytes()
        export_dir = write_saved_model(model, Preprocessing(image_size=(size, size)), f"{root}/export")
        warmup.write_warmup_requests(export_dir, "patchnet", [data])  # as `patchnet push` does
        base = f"{root}/models/patchnet"
        copy_version(export_dir, base, 1)

        start = time.perf_counter()  # the same-run reference: load and warm up in this process
        local = LoadedModel(export_dir)
        warmup.replay_warmup(local, export_dir)
        in_process_load = time.perf_counter() - start
        local.close()

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        address = f"127.0.0.1:{port}"
        process = start_serve(base, port)
        wait_for_line(process)

        def client_loop(index):
            while not stop.is_set():
                try:
                    client.predict(address, "patchnet", [data], wait=300)
                    answers[index].append((time.monotonic(), True))
                except PatchNetError:
                    answers[index].append((time.monotonic(), False))

        threads = [threading.Thread(target=client_loop, args=(index,), daemon=True) for index in range(CLIENTS)]
        for thread in threads:
            thread.start()
        rows = []
        for restart in range(args.restarts):
            while not all(any(at > time.monotonic() - 2 and ok for at, ok in a) for a in answers):
                time.sleep(0.1)  # under load: every client answered in the last 2 s
            killed = time.monotonic()
            process.send_signal(signal.SIGKILL)
            process.wait()
            process = start_serve(base, port)
            restarted = time.monotonic()
            listening = wait_for_line(process)
            while not all(any(at > restarted and ok for at, ok in a) for a in answers):
                time.sleep(0.02)
            firsts = [min(at for at, ok in a if at > restarted and ok) for a in answers]
            failed = sum(1 for a in answers for at, ok in a if killed < at and not ok)
            rows.append({
                "restart": restart + 1,
                "serving_line_s": listening - restarted,
                "first_answer_s": min(firsts) - restarted,
                "all_clients_answered_s": max(firsts) - restarted,
                "failed_calls": failed,
            })
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=600)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)

    first = statistics.median(row["first_answer_s"] for row in rows)
    summary = {
        "median_first_answer_s": first,
        "in_process_load_and_warmup_s": in_process_load,
        "first_answer_over_in_process_load": first / in_process_load,
    }
    print_table(
        f"bench.serving_restart ({'quick' if quick else 'default'}): kill -9 of `patchnet serve` under "
        f"{CLIENTS} `patchnet predict` clients, restart on the same port; subnet p=21 {layers}x{filters}, "
        f"{size}x{size} PNG, warmup records; seconds from the restart",
        rows,
        [("restart", "restart"), ("serving_line_s", "listening s"), ("first_answer_s", "first answer s"),
         ("all_clients_answered_s", "all clients s"), ("failed_calls", "failed calls")],
    )
    print_table("same run", [{"measure": k, "value": v} for k, v in summary.items()],
                [("measure", "measure"), ("value", "value")])
    write_json("serving_restart_quick" if quick else "serving_restart", {
        "environment": environment(), "quick": quick, "image_size": size, "filters": filters,
        "conv_layers": layers, "clients": CLIENTS, "rows": rows, "summary": summary,
    })


if __name__ == "__main__":
    main()
