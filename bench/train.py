"""Training benchmark: train steps of the paper's model, and the fully convolutional valid path.

    python -m bench.train            # 192 x 256 images, batch 4 (about 5 minutes on 2 cores)
    python -m bench.train --quick    # 96 x 128 images, batch 2, under 2 minutes
    python -m bench.train --which-padding [--seeds 3] [--epochs 30]
        # trains padding="same" and "valid" alike on the bundled texture
        # dataset (pipelines/textures.py) and compares accuracy, heatmap
        # AUROC and heatmap time; writes bench/results/which_padding.json

Model: the paper's ISIC subnet, p = 21, 7 x 64 3x3 convs, Adam 1e-4, binary
cross-entropy, `model.compile(...)` + `train_on_batch` (the `fit` path).
Train-step FLOPs are counted as 3 x the subnet's forward FLOPs per patch.
Writes bench/results/train[_quick].json.
"""

import argparse
import math

import keras
import numpy as np
import tensorflow as tf

from bench.common import (
    MetricRows,
    environment,
    one_pass_flops,
    paired,
    print_table,
    subnet_patch_flops,
    write_json,
)
from patchnet_tf.layers import ConvolutionalPatchwiseSubnet, MeanPatchProbability
from patchnet_tf.model import PatchNet, build_patchnet

PATCH = 21


def compiled(model, jit_compile=False):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", jit_compile=jit_compile
    )
    return model


def convolutional_twin(model, stride):
    """The same subnet (shared weights) behind `ConvolutionalPatchwiseSubnet` instead of patches."""
    subnet = model.get_layer("subnet")
    images = keras.Input((None, None, subnet.input_shape[-1]), name="image")
    probabilities = ConvolutionalPatchwiseSubnet(subnet, PATCH, stride, name="patchwise")(images)
    probability = MeanPatchProbability(name="probability")(probabilities)
    return PatchNet(images, probability, name="patchnet")


def loss_and_gradients(model, images, labels):
    with tf.GradientTape() as tape:
        loss = keras.losses.binary_crossentropy(labels, model(images, training=True))
    weights = model.get_layer("subnet").trainable_weights
    return loss.numpy(), [g.numpy() for g in tape.gradient(loss, weights)]


def which_padding(seeds, epochs):
    """Same vs valid on the tinted textures (easy: both paddings learn), p = 11, 4 x 32 convs, plain fit."""
    from bench.common import timed
    from patchnet_tf.heatmaps import heatmap
    from patchnet_tf.metrics import mask_metrics
    from pipelines.textures import texture_example

    def split(name, count):
        examples = [
            (texture_example(0, name, inlay, index, tint=True), inlay)
            for inlay in (False, True) for index in range(count)
        ]
        images = np.stack([image for (image, _), _ in examples]).astype(np.float32) / 255.0
        masks = np.stack([mask for (_, mask), _ in examples])
        labels = np.array([[float(inlay)] for _, inlay in examples], np.float32)
        return images, labels, masks

    train, test = split("train", 40), split("test", 16)
    big = np.random.default_rng(0).random((192, 256, 3), dtype=np.float32)
    rows, runs = [], []
    for padding in ("same", "valid"):
        for seed in range(seeds):
            keras.utils.set_random_seed(seed)
            model = build_patchnet(11, padding=padding, filters=32, conv_layers=4)
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                          metrics=["accuracy"])
            fit = timed(lambda: model.fit(train[0], train[1], batch_size=8, epochs=epochs,  # noqa: B023 (called at once)
                                          shuffle=True, verbose=0), warmup=0, repeats=1)
            _, accuracy = model.evaluate(test[0], test[1], verbose=0)
            from sklearn.metrics import roc_auc_score

            image_auroc = float(roc_auc_score(test[1][:, 0], model.predict(test[0], verbose=0)[:, 0]))
            inlays = test[1][:, 0] == 1
            maps = heatmap(model, test[0][inlays])
            metrics = mask_metrics(maps, test[2][inlays])
            heatmap(model, big[:11, :11])
            map_64 = timed(lambda: heatmap(model, test[0][0]), repeats=5)  # noqa: B023 (called at once)
            map_big = timed(lambda: heatmap(model, big), warmup=0,  # noqa: B023 (called at once)
                            repeats=1 if padding == "same" else 3)
            runs.append({"padding": padding, "seed": seed, "test_accuracy": accuracy,
                         "image_auroc": image_auroc, **metrics,
                         "fit_s": fit["median_s"], "heatmap_64_s": map_64["median_s"],
                         "heatmap_64_cpu_s": map_64["cpu_median_s"],
                         "heatmap_192x256_s": map_big["median_s"],
                         "heatmap_192x256_cpu_s": map_big["cpu_median_s"]})
            print(f"  {runs[-1]}", flush=True)
        mine = [run for run in runs if run["padding"] == padding]

        def mean(key, mine=mine):
            return float(np.mean([run[key] for run in mine]))

        rows.append({
            "padding": padding, "seeds": seeds,
            "test_accuracy": mean("test_accuracy"),
            "accuracy_range": f"{min(r['test_accuracy'] for r in mine):.3f}-{max(r['test_accuracy'] for r in mine):.3f}",
            "image_auroc": mean("image_auroc"),
            "auroc": mean("auroc"),
            "exact_match": mean("exact_match"),
            "recall": mean("recall"),
            "fit_s": mean("fit_s"),
            "heatmap_64_s": mean("heatmap_64_s"),
            "heatmap_192x256_s": mean("heatmap_192x256_s"),
            "heatmap_192x256_cpu_s": mean("heatmap_192x256_cpu_s"),
        })
    print_table(
        "which padding? tinted textures 64x64 (40 + 40 train, 16 + 16 test), p = 11, 4 x 32 convs, "
        f"Adam 1e-3, batch 8, {epochs} epochs; means over seeds",
        rows,
        [("padding", "padding"), ("seeds", "seeds"), ("test_accuracy", "test acc"),
         ("accuracy_range", "acc range"), ("image_auroc", "image AUROC"), ("auroc", "heatmap AUROC"),
         ("exact_match", "exact match"),
         ("recall", "recall"), ("fit_s", "fit s"), ("heatmap_64_s", "map 64x64 s"),
         ("heatmap_192x256_s", "map 192x256 s"), ("heatmap_192x256_cpu_s", "map 192x256 CPU s")],
    )
    write_json("which_padding", {"environment": environment(), "epochs": epochs, "rows": rows, "runs": runs})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="96 x 128, batch 2; under 2 minutes")
    parser.add_argument("--which-padding", action="store_true",
                        help="train same and valid models on the tinted textures and compare")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per padding for --which-padding")
    parser.add_argument("--epochs", type=int, default=30, help="epochs for --which-padding")
    args = parser.parse_args(argv)
    if args.which_padding:
        return which_padding(args.seeds, args.epochs)
    quick = args.quick
    height, width, batch = (96, 128, 2) if quick else (192, 256, 4)
    pairs = 2 if quick else 3
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((batch, height, width, 3), dtype=np.float32))
    labels = tf.constant(np.arange(batch, dtype=np.float32)[:, None] % 2)
    results = {"environment": environment(), "quick": quick, "image": [height, width],
               "batch": batch, "patch_size": PATCH}
    row = MetricRows()
    results["matmul_gflops"] = peak = row.matmul_reference()

    # --- the paper's model: padding="same", stride = p -------------------------------------
    keras.utils.set_random_seed(0)
    same = compiled(build_patchnet(PATCH, padding="same"))
    if quick:
        comparison = paired(
            lambda: same.train_on_batch(images, labels), lambda: None, warmup=2, pairs=pairs
        )
    else:
        keras.utils.set_random_seed(0)
        same_xla = compiled(build_patchnet(PATCH, padding="same"), jit_compile=True)
        comparison = paired(
            lambda: same.train_on_batch(images, labels),
            lambda: same_xla.train_on_batch(images, labels),
            warmup=2, pairs=pairs,
        )
    results["same_train_step"] = comparison
    patches = math.ceil(height / PATCH) * math.ceil(width / PATCH) * batch
    step_s = comparison["a"]["median_s"]
    flops = 3 * subnet_patch_flops(PATCH, padding="same") * patches
    row(f"same, stride {PATCH}: train step, batch {batch} ({patches} patches)", step_s, "s")
    row("same: images/s", batch / step_s, "img/s")
    row("same: patches/s (train)", patches / step_s, "patches/s")
    row("same: achieved (3 x forward FLOPs)", flops / step_s / 1e9, "GFLOP/s")
    row("same: achieved / matmul", flops / step_s / 1e9 / peak, "x")
    if not quick:
        row("same: XLA train step / no XLA, CPU time (paired)", comparison["cpu_ratio_b_over_a"], "x")
        row("same: XLA train step / no XLA, wall (paired)", comparison["ratio_b_over_a"], "x")

    # --- padding="valid": per-patch against fully convolutional ------------------------------
    strides = (PATCH, 7) if quick else (PATCH, 7, 3)
    for stride in strides:
        keras.utils.set_random_seed(0)
        per_patch = build_patchnet(PATCH, padding="valid", stride=stride)
        convolutional = convolutional_twin(per_patch, stride)
        step_images, step_labels = (images, labels) if stride == PATCH else (images[:1], labels[:1])
        loss_a, grads_a = loss_and_gradients(per_patch, step_images, step_labels)
        loss_b, grads_b = loss_and_gradients(convolutional, step_images, step_labels)
        loss_error = float(np.abs(loss_a - loss_b).max())
        error = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(grads_a, grads_b))
        compiled(per_patch)
        compiled(convolutional)
        comparison = paired(
            lambda: per_patch.train_on_batch(step_images, step_labels),  # noqa: B023 (called at once)
            lambda: convolutional.train_on_batch(step_images, step_labels),  # noqa: B023 (called at once)
            warmup=1, pairs=pairs,
        )
        results[f"valid_stride_{stride}"] = {
            **comparison, "loss_abs_error": loss_error, "gradient_relative_error": error
        }
        count = math.ceil(height / stride) * math.ceil(width / stride) * len(step_images)
        label = f"valid, stride {stride}, batch {len(step_images)} ({count} patches)"
        row(f"{label}: per-patch train step", comparison["a"]["median_s"], "s")
        row(f"{label}: fully convolutional train step", comparison["b"]["median_s"], "s")
        row(f"{label}: speed-up of fully convolutional, CPU time", 1 / comparison["cpu_ratio_b_over_a"], "x",
            "> 1 when patches overlap")
        row(f"{label}: loss, max abs difference", loss_error, "", "<= 1e-5", loss_error <= 1e-5)
        row(f"{label}: gradients, max abs difference / max abs gradient", error, "",
            "<= 1e-4 (float32 sums)", error <= 1e-4)
        per_patch_flops = subnet_patch_flops(PATCH, padding="valid") * count
        rows_fc = one_pass_flops(height, width, PATCH, stride=stride) * len(step_images)
        row(f"{label}: forward FLOPs, fully conv / per-patch", rows_fc / per_patch_flops, "x")

    row.report(
        f"bench.train ({'quick' if quick else 'default'}; p = {PATCH}, 7 x 64 convs; "
        f"{height}x{width}, Adam, train_on_batch)",
        "train_quick" if quick else "train",
        results,
    )


if __name__ == "__main__":
    main()
