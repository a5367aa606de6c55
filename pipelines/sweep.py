"""`patchnet sweep`: one training run per setting, a table like the paper's Tables 5 and 8.

    patchnet sweep DATA --out SWEEP --patch-sizes 11,17,31 [--archs patchnet,cam,vgg11]
                   [--learning-rates 1e-4,1e-3] [any `patchnet train` flag]

Each setting trains into SWEEP/<run>/ (a normal run folder, so an
interrupted sweep resumes run by run). The table (train and validation loss
and accuracy at the best validation epoch, median seconds per epoch) is
written as SWEEP/sweep.csv and SWEEP/sweep.md; `tensorboard --logdir SWEEP`
shows every run, and the HParams dashboard compares them.
"""

import csv
import io
import itertools
import os
import statistics

from patchnet_tf.atomic import atomic_write_text
from patchnet_tf.errors import PatchNetError
from pipelines.settings import ARCHS

COLUMNS = (
    "model",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "seconds_per_epoch",
    "epochs",
    "run",
)


def settings(config):
    """(run name, config overrides) for every point of the grid, in table order."""
    archs = config["archs"]
    unknown = [arch for arch in archs if arch not in ARCHS]
    if unknown:
        raise PatchNetError(f"--archs: unknown architecture(s) {', '.join(unknown)}; use {', '.join(ARCHS)}")
    rates = config["learning_rates"] or [config["learning_rate"]]
    points = []
    for arch in archs:
        sizes = (config["patch_sizes"] or [config["patch_size"]]) if arch == "patchnet" else [None]
        for size, rate in itertools.product(sizes, rates):
            name = f"PatchNet-{size}" if arch == "patchnet" else {"cam": "CAM", "vgg11": "VGG-11"}[arch]
            overrides = {"arch": arch, "learning_rate": rate}
            if size is not None:
                overrides["patch_size"] = size
            if len(rates) > 1:
                name += f" lr={rate:g}"
            points.append((name, overrides))
    folders = [run_folder_name(name) for name, _ in points]
    repeated = sorted({folder for folder in folders if folders.count(folder) > 1})
    if repeated:  # two runs in one folder: the second would resume the first, its row a copy
        raise PatchNetError(f"two settings would train into the same run folder {', '.join(repeated)}; "
                            "give each --archs, --patch-sizes and --learning-rates value once")
    return points


def run_folder_name(name):
    return name.lower().replace(" ", "-").replace("=", "")


def summarize(run_dir):
    """Reads a run's history.csv: the best-validation-loss epoch and the median epoch time."""
    path = os.path.join(run_dir, "history.csv")
    try:
        with open(path, newline="") as file:
            rows = [row for row in csv.DictReader(file) if row.get("val_loss")]
    except FileNotFoundError:
        raise PatchNetError(f"{path}: missing; the run did not finish an epoch") from None
    if not rows:
        raise PatchNetError(f"{path}: no finished epochs")
    best = min(rows, key=lambda row: float(row["val_loss"]))
    seconds = [float(row["seconds"]) for row in rows if row.get("seconds")]
    return {
        "train_loss": float(best["loss"]),
        "train_accuracy": float(best["accuracy"]),
        "val_loss": float(best["val_loss"]),
        "val_accuracy": float(best["val_accuracy"]),
        "seconds_per_epoch": statistics.median(seconds) if seconds else float("nan"),
        "epochs": len(rows),
    }


def markdown_table(rows):
    header = ("Model", "Training Loss", "Training Accuracy", "Validation Loss", "Validation Accuracy",
              "Training Time Per Epoch (Seconds)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['train_loss']:.3f} | {100 * row['train_accuracy']:.1f}% | "
            f"{row['val_loss']:.3f} | {100 * row['val_accuracy']:.1f}% | {row['seconds_per_epoch']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _write_hparams_config(out, points):
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams_api

    swept = sorted({key for _, overrides in points for key in overrides})
    values = {key: sorted({overrides[key] for _, overrides in points if key in overrides}, key=str)
              for key in swept}
    hparams = [hparams_api.HParam(key, hparams_api.Discrete(values[key])) for key in swept]
    metrics = [
        hparams_api.Metric(f"epoch_{name}", group=group, display_name=f"{group} {name}")
        for group in ("train", "validation")
        for name in ("loss", "accuracy", "auroc")
    ]
    with tf.summary.create_file_writer(out).as_default():
        hparams_api.hparams_config(hparams=hparams, metrics=metrics)


def sweep(config):
    """Trains every setting (resuming finished or interrupted runs); returns the table rows."""
    from pipelines.train import check_settings, train

    points = settings(config)
    base = {key: value for key, value in config.items() if key not in ("archs", "patch_sizes", "learning_rates")}
    for name, overrides in points:  # every run's settings, before the first one trains
        check_settings({**base, **overrides, "out": os.path.join(config["out"], run_folder_name(name))})
    rows = []
    for index, (name, overrides) in enumerate(points, start=1):
        run_dir = os.path.join(config["out"], run_folder_name(name))
        print(f"[{index}/{len(points)}] {name} -> {run_dir}", flush=True)
        train({**base, **overrides, "out": run_dir})
        if index == 1:  # once a run has read the data: a bad image leaves no sweep folder behind
            _write_hparams_config(config["out"], points)
        rows.append({"model": name, **summarize(run_dir), "run": run_dir})
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(os.path.join(config["out"], "sweep.csv"), text.getvalue())
    atomic_write_text(os.path.join(config["out"], "sweep.md"), markdown_table(rows))
    return rows


def run(args):
    rows = sweep(dict(vars(args)))
    print(markdown_table(rows), end="")
    print(f"wrote {os.path.join(args.out, 'sweep.csv')} and sweep.md; tensorboard --logdir {args.out}")
