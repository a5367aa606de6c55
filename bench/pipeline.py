"""Input-pipeline benchmark: does tf.data keep the model busy, and how busy is the model?

    python -m bench.pipeline [--quick]

1. Fit throughput (images/s) with the real training pipeline
   (`pipelines.data.image_dataset`: decode pass + in-memory cache, class
   balance, shuffle, batch, prefetch; the `AugmentedModel` training step)
   against `fit` on the same tensors already in memory as NumPy arrays.
   Target: ratio >= 0.9. Also the streaming pipeline (decode every epoch)
   and the pipeline with augmentation on, for what they cost.
2. Training throughput in patches/s and achieved GFLOP/s (forward + backward
   counted as 3x the forward FLOPs) against a large matmul's GFLOP/s
   measured in the same run.
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras

from bench.common import environment, matmul_gflops, print_table, subnet_patch_flops, write_json
from patchnet_tf.augment import Augmentation, AugmentedModel
from patchnet_tf.preprocessing import Preprocessing
from pipelines.data import image_dataset, load_folder_dataset
from pipelines.textures import write_texture_dataset
from pipelines.train import compile_model


class _EpochTimes(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._start)


def _trainer(model_options, augmentation=Augmentation()):
    from patchnet_tf import build_patchnet

    keras.utils.set_random_seed(0)
    model = build_patchnet(**model_options)
    return compile_model(AugmentedModel(model, augmentation), 1e-4)


def _fit_seconds(model_options, data, epochs, augmentation=Augmentation(), **fit_options):
    """Median epoch time after the first (tracing) epoch. Shared machines drift: compare
    ratios from one run, not absolute times across runs."""
    trainer = _trainer(model_options, augmentation)
    timer = _EpochTimes()
    trainer.fit(data, epochs=epochs, verbose=0, callbacks=[timer], shuffle=False, **fit_options)
    return statistics.median(timer.times[1:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller dataset and fewer epochs (under 2 minutes)")
    args = parser.parse_args(argv)
    size, per_class, epochs, batch = (64, 48, 3, 16) if args.quick else (64, 256, 6, 16)
    model_options = dict(patch_size=17, filters=16, conv_layers=3) if args.quick else dict(
        patch_size=17, filters=32, conv_layers=4)
    root = tempfile.mkdtemp(prefix="bench-pipeline-")
    write_texture_dataset(root, image_size=(size, size), count={"train": per_class, "val": 2, "test": 1})
    split = load_folder_dataset(root).splits["train"]
    preprocessing = Preprocessing(image_size=(size, size))
    count = len(split)

    # The same tensors, decoded once, in memory.
    arrays = list(image_dataset(split, preprocessing, count, cache="memory"))[0]
    x, y = arrays[0].numpy(), arrays[1].numpy()

    rows = []
    in_memory = _fit_seconds(model_options, x, epochs, batch_size=batch, y=y)
    rows.append({"setting": "fit on in-memory NumPy tensors", "seconds_per_epoch": in_memory})
    cached = image_dataset(split, preprocessing, batch, shuffle=True, balance=True, cache="memory")
    rows.append({"setting": "real pipeline (cached, balanced)", "seconds_per_epoch": _fit_seconds(model_options, cached, epochs)})
    streamed = image_dataset(split, preprocessing, batch, shuffle=True, balance=True, cache="off")
    rows.append({"setting": "real pipeline, decode every epoch",
                 "seconds_per_epoch": _fit_seconds(model_options, streamed, epochs)})
    augmented = Augmentation(rotation=180, zoom=1.2, horizontal_flip=True, vertical_flip=True)
    rows.append({"setting": "real pipeline + augmentation in the step",
                 "seconds_per_epoch": _fit_seconds(model_options, cached, epochs, augmentation=augmented)})

    patches_per_image = (-(-size // model_options["patch_size"])) ** 2
    flops_per_patch = 3 * subnet_patch_flops(**model_options, channels=3)
    peak = matmul_gflops()
    for row in rows:
        row["images_per_s"] = count / row["seconds_per_epoch"]
        row["ratio_vs_in_memory"] = in_memory / row["seconds_per_epoch"]
        row["patches_per_s"] = row["images_per_s"] * patches_per_image
        row["gflops"] = row["patches_per_s"] * flops_per_patch / 1e9
        row["fraction_of_matmul"] = row["gflops"] / peak
    print_table(
        f"Fit throughput, {count} images {size}x{size}, batch {batch}, PatchNet-{model_options['patch_size']} "
        f"({model_options['filters']} filters, {model_options['conv_layers']} convs), "
        f"{patches_per_image} patches/image; matmul {peak:.1f} GFLOP/s",
        rows,
        [("setting", "setting"), ("seconds_per_epoch", "s/epoch"), ("images_per_s", "images/s"),
         ("ratio_vs_in_memory", "vs in-memory"), ("patches_per_s", "patches/s"), ("gflops", "GFLOP/s"),
         ("fraction_of_matmul", "of matmul")],
    )
    ratio = rows[1]["ratio_vs_in_memory"]
    print(f"\nreal pipeline / in-memory: {ratio:.2f} (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")
    write_json("pipeline_quick" if args.quick else "pipeline", {
        "environment": environment(),
        "images": count, "image_size": size, "batch_size": batch, "epochs": epochs,
        "model": model_options, "matmul_gflops": peak, "rows": rows, "target_ratio_met": ratio >= 0.9,
    })


if __name__ == "__main__":
    main()
