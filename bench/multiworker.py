"""One worker against two: how closely `--strategy multiworker` on two workers follows one.

    python -m bench.multiworker                 # seeds 0-2, 3 epochs, augmentation off and on
    python -m bench.multiworker --seeds 1 --epochs 2 --count 16

Each setting trains the same tiny PatchNet on the bundled texture data
(32 x 32, `--count` images per class in train and val, default 12 and 4 as
in the test; global batch 8, Adam 3e-3) twice at once: as
a cluster of one worker and of two (pipelines/cluster.py, 127.0.0.1), with
the same TF_CONFIG code path, so only the number of workers differs. It
reports the largest differences of the per-epoch losses (history.csv) and of
the final weights (model.keras). With augmentation off the two compute the
same updates up to summation order; with it on (border patches, PatchNet's
default) each replica draws its own augmentation, so the runs differ the way
two seeds' draws do, and the same table shows by how much. Writes
bench/results/multiworker.json.
"""

import argparse
import csv
import os
import tempfile

import numpy as np

from bench.common import environment, print_table, write_json
from patchnet_tf.runs import load_trained_model
from pipelines.cluster import free_ports, start_workers
from pipelines.textures import write_texture_dataset

FLAGS = ["--image-size", "32x32", "--patch-size", "9", "--filters", "4", "--conv-layers", "2",
         "--learning-rate", "3e-3", "--heatmap-every", "0", "--batch-size", "8"]


def train_clusters(data, root, seed, epochs, augmentation):
    """Trains with one and with two workers at once; returns {workers: run folder}."""
    extra = ["--seed", str(seed), "--epochs", str(epochs)] + ([] if augmentation else ["--no-border-patches"])
    runs, processes = {}, []
    for count in (1, 2):
        runs[count] = os.path.join(root, f"seed{seed}-{'aug' if augmentation else 'plain'}-{count}")
        addresses = [f"127.0.0.1:{port}" for port in free_ports(count)]
        processes += start_workers([data, "--out", runs[count], *FLAGS, *extra], addresses,
                                   log_path=lambda index, run=runs[count]: f"{run}-worker{index}.log",
                                   env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    for process in processes:
        if process.wait() != 0:
            raise SystemExit(f"a worker failed; see the logs in {root}")
    return runs


def losses(run):
    with open(os.path.join(run, "history.csv")) as file:
        rows = list(csv.DictReader(file))
    return {name: np.array([float(row[name]) for row in rows]) for name in ("loss", "val_loss")}


def compare(runs):
    one, two = losses(runs[1]), losses(runs[2])
    (model_one, _), (model_two, _) = load_trained_model(runs[1]), load_trained_model(runs[2])
    weights_one = np.concatenate([w.ravel() for w in model_one.get_weights()])
    weights_two = np.concatenate([w.ravel() for w in model_two.get_weights()])
    return {
        "loss_max_abs_diff": float(np.abs(one["loss"] - two["loss"]).max()),
        "val_loss_max_abs_diff": float(np.abs(one["val_loss"] - two["val_loss"]).max()),
        "weights_max_abs_diff": float(np.abs(weights_one - weights_two).max()),
        "weights_relative_l2_diff": float(np.linalg.norm(weights_one - weights_two) / np.linalg.norm(weights_one)),
        "final_loss_one_worker": float(one["loss"][-1]),
        "final_loss_two_workers": float(two["loss"][-1]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--count", type=int, default=None,
                        help="images per class in train and in val (default: 12 and 4, the test's)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-multiworker-") as root:
        data = write_texture_dataset(os.path.join(root, "data"), image_size=(32, 32),
                                     count={"train": args.count or 12, "val": args.count or 4, "test": 1})
        rows = []
        for augmentation in (False, True):
            for seed in range(args.seeds):
                row = {"augmentation": "border patches" if augmentation else "off", "seed": seed,
                       **compare(train_clusters(data, root, seed, args.epochs, augmentation))}
                rows.append(row)
                print(row, flush=True)
    print_table(f"one worker vs two, global batch 8, {args.epochs} epochs, count {args.count or 12}", rows, [
        ("augmentation", "augmentation"), ("seed", "seed"),
        ("loss_max_abs_diff", "loss diff"), ("val_loss_max_abs_diff", "val_loss diff"),
        ("weights_max_abs_diff", "weights max diff"), ("weights_relative_l2_diff", "weights rel. L2"),
        ("final_loss_one_worker", "loss (1 worker)"), ("final_loss_two_workers", "loss (2 workers)"),
    ])
    name = "multiworker" if args.count is None else f"multiworker_count{args.count}"
    write_json(name, {"environment": environment(), "epochs": args.epochs, "count": args.count, "rows": rows})


if __name__ == "__main__":
    main()
