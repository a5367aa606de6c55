"""A multi-worker cluster on this machine: `patchnet train --strategy multiworker` per worker.

    python -m pipelines.cluster --workers 2 -- DATA --out RUN [patchnet train flags]

starts one `patchnet train ... --strategy multiworker` process per worker on
127.0.0.1 (free ports, its own TF_CONFIG each), prefixes their output with
the worker's index and exits with the first non-zero status (0 when all
finished). On a real cluster, the same command runs once per machine or pod
with TF_CONFIG set by hand or by the scheduler (docs/training.md); this is
the recipe in one process tree, for trying it and for the tests.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading


def free_ports(count):
    """`count` TCP ports free on 127.0.0.1 right now (held open together, so distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(addresses, index):
    """The TF_CONFIG of worker `index` in a cluster of `addresses` (worker 0 is the chief)."""
    return json.dumps({"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}})


def start_workers(train_args, addresses, *, log_path=None, env=None):
    """One `patchnet train TRAIN_ARGS --strategy multiworker` process per address, as subprocess.Popen.

    Each worker's stdout and stderr go to the file `log_path(index)`, or to a pipe without `log_path`.
    """
    workers = []
    for index in range(len(addresses)):
        worker_env = {**os.environ, **(env or {}), "TF_CONFIG": tf_config(addresses, index)}
        command = [sys.executable, "-m", "patchnet_tf", "train", *train_args, "--strategy", "multiworker"]
        if log_path is None:
            workers.append(subprocess.Popen(command, env=worker_env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True))
            continue
        with open(log_path(index), "w") as log:  # the worker keeps its own copy of the descriptor
            workers.append(subprocess.Popen(command, env=worker_env, stdout=log, stderr=subprocess.STDOUT))
    return workers


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipelines.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the `patchnet train` arguments")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    addresses = [f"127.0.0.1:{port}" for port in free_ports(args.workers)]
    workers = start_workers(train_args, addresses)

    def relay(index, worker):
        for line in worker.stdout:
            print(f"[worker {index}] {line}", end="", flush=True)

    relays = [threading.Thread(target=relay, args=pair) for pair in enumerate(workers)]
    for thread in relays:
        thread.start()
    statuses = [worker.wait() for worker in workers]
    for thread in relays:
        thread.join()
    return next((status for status in statuses if status), 0)


if __name__ == "__main__":
    sys.exit(main())
