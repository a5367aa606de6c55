"""Heatmap benchmark: per-patch ("same") and one-pass ("valid") maps against a matmul and Grad-CAM.

    python -m bench.heatmap            # full 192 x 256 maps (about 5 minutes on 2 cores)
    python -m bench.heatmap --quick    # smaller same-model image, under 2 minutes

Model: the paper's ISIC subnet, p = 21, 7 x 64 3x3 convs, random weights
(speed does not depend on the weights). Writes bench/results/heatmap[_quick].json.
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
    subnet_patch_flops,
    timed,
    vgg11,
    vgg11_forward_flops,
)
from patchnet_tf import heatmaps
from patchnet_tf.model import build_patchnet

PATCH = 21
HEIGHT, WIDTH = 192, 256
TARGET_OVERHEAD_RATIO = 0.9
TARGET_ONE_PASS_SPEEDUP = 100.0


def plain_forward_rate(subnet, patches, chunk, *, jit_compile=False, repeats=1):
    """Patches/s of the subnet on pre-extracted patches, `chunk` at a time (no extraction, no loop)."""
    forward = tf.function(lambda x: subnet(x, training=False), jit_compile=jit_compile)
    chunks = [patches[i : i + chunk] for i in range(0, len(patches), chunk)]
    timing = timed(
        lambda: [forward(c).numpy() for c in chunks],
        warmup=1, repeats=repeats,
    ) if len(chunks) > 1 else timed(lambda: forward(chunks[0]).numpy(), warmup=1, repeats=repeats)
    return len(patches) / timing["median_s"], timing


def heatmap_rate(model, image, *, stride=1, repeats=1, **options):
    """Seconds per heatmap() of `image` (traced once on a small image first)."""
    heatmaps.heatmap(model, image[:PATCH, :PATCH], stride=stride, **options)
    timing = timed(lambda: heatmaps.heatmap(model, image, stride=stride, **options), warmup=0, repeats=repeats)
    return timing


def grad_cam_function(dense_units=4096):
    """Grad-CAM on a plain VGG-11: forward, gradient of the class score w.r.t. the last conv maps."""
    keras.utils.set_random_seed(0)
    features, head = vgg11(224, dense_units)

    @tf.function
    def grad_cam(images):
        with tf.GradientTape() as tape:
            activations = features(images, training=False)
            tape.watch(activations)
            score = head(activations, training=False)[:, 0]
        gradients = tape.gradient(score, activations)
        weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1, keepdims=True))
        cam = tf.image.resize(cam, [224, 224])[..., 0]
        return cam / (tf.reduce_max(cam, axis=[1, 2], keepdims=True) + 1e-8)

    image = tf.random.uniform([1, 224, 224, 3])
    return lambda: grad_cam(image).numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller same-model image; under 2 minutes")
    parser.add_argument("--dense-units", type=int, default=4096, help="VGG-11 dense head width")
    args = parser.parse_args(argv)
    quick = args.quick
    rng = np.random.default_rng(0)
    image = rng.random((HEIGHT, WIDTH, 3), dtype=np.float32)
    results = {"environment": environment(), "quick": quick, "patch_size": PATCH,
               "image": [HEIGHT, WIDTH], "model": "subnet 7 x 64 3x3 convs, p = 21, random weights"}
    row = MetricRows()
    results["matmul_gflops"] = peak = row.matmul_reference()

    # --- the paper's padding="same" model: per-patch ---------------------------------------
    keras.utils.set_random_seed(0)
    same = build_patchnet(PATCH, padding="same")
    subnet = same.get_layer("subnet")
    flops_same = subnet_patch_flops(PATCH, padding="same")
    chunk = heatmaps.DEFAULT_CHUNK_PATCHES
    same_size = (32, 48) if quick else (HEIGHT, WIDTH)
    same_image = image[: same_size[0], : same_size[1]]
    patches = tf.image.extract_patches(
        tf.pad(same_image, [[10, 10], [10, 10], [0, 0]])[None], [1, PATCH, PATCH, 1],
        [1, 1, 1, 1], [1, 1, 1, 1], "VALID",
    )
    patches = tf.reshape(patches, [-1, PATCH, PATCH, 3])
    forward = tf.function(
        lambda x: subnet(x, training=False),
        input_signature=[tf.TensorSpec([None, PATCH, PATCH, 3], tf.float32)],
    )
    chunks = [patches[i : i + chunk] for i in range(0, len(patches), chunk)]
    # Warm up on small inputs (tracing, oneDNN primitives), then time the full work in turns.
    heatmaps.heatmap(same, same_image[:PATCH, :PATCH])
    forward(chunks[0][:1])
    comparison = paired(
        lambda: [forward(c).numpy() for c in chunks],
        lambda: heatmaps.heatmap(same, same_image),
        warmup=1 if quick else 0, pairs=2 if quick else 1,
    )
    results["same_plain_vs_heatmap"] = comparison
    num_patches = same_size[0] * same_size[1]
    plain_rate = num_patches / comparison["a"]["median_s"]
    map_rate = num_patches / comparison["b"]["median_s"]
    row(f"same: plain batched subnet forward ({chunk}/call)", plain_rate, "patches/s")
    row("same: achieved", plain_rate * flops_same / 1e9, "GFLOP/s")
    row("same: achieved / matmul", plain_rate * flops_same / 1e9 / peak, "x")
    row(f"same: heatmap() {same_size[0]}x{same_size[1]} stride 1", map_rate, "patches/s")
    row("same: heatmap() / plain forward throughput, wall (paired)",
        1.0 / comparison["ratio_b_over_a"], "x")
    ratio = 1.0 / comparison["cpu_ratio_b_over_a"]
    row("same: heatmap() / plain forward throughput, CPU time (paired)", ratio, "x",
        f">= {TARGET_OVERHEAD_RATIO}", ratio >= TARGET_OVERHEAD_RATIO)
    full_same_s = HEIGHT * WIDTH / map_rate
    row(f"same: stride-1 {HEIGHT}x{WIDTH} map" + (" (from the rate above)" if quick else ""),
        full_same_s, "s")
    # Stride trade-off, in CPU time (single short runs; wall time swings with the load).
    stride_1_cpu = comparison["b"]["cpu_median_s"]
    for stride in (2, 4):
        timing = heatmap_rate(same, same_image, stride=stride, repeats=2)
        grid = math.ceil(same_size[0] / stride) * math.ceil(same_size[1] / stride)
        row(f"same: stride {stride} map {same_size[0]}x{same_size[1]}", timing["median_s"], "s")
        row(f"same: stride {stride} cost / stride-1 cost, CPU time", timing["cpu_median_s"] / stride_1_cpu,
            "x", f"~{1 / stride**2:.3f} (1/s^2; {grid} patches)")
    if not quick:
        sweep_image = image[:64, :96]
        for sweep_chunk in (256, 1024, 4096):
            timing = heatmap_rate(same, sweep_image, chunk_patches=sweep_chunk)
            row(f"same: heatmap() 64x96, chunk {sweep_chunk}", 64 * 96 / timing["median_s"], "patches/s")
        xla = tf.function(lambda x: subnet(x, training=False), jit_compile=True)
        comparison = paired(lambda: forward(chunks[0]).numpy(), lambda: xla(chunks[0]).numpy())
        row("same: plain forward CPU time, XLA / no XLA (paired)", comparison["cpu_ratio_b_over_a"], "x")

    # --- padding="valid": one pass against per-patch ------------------------------------------
    keras.utils.set_random_seed(0)
    valid = build_patchnet(PATCH, padding="valid")
    valid_subnet = valid.get_layer("subnet")
    timing = heatmap_rate(valid, image, repeats=5)
    one_pass_s = timing["median_s"]
    results["valid_one_pass_s"] = timing
    row(f"valid: one-pass heatmap() {HEIGHT}x{WIDTH} stride 1", one_pass_s, "s")
    row("valid: one-pass achieved", one_pass_flops(HEIGHT, WIDTH, PATCH) / one_pass_s / 1e9, "GFLOP/s")
    flops_valid = subnet_patch_flops(PATCH, padding="valid")
    if quick:
        count = min(len(patches), 2048)
        valid_rate, per_patch_timing = plain_forward_rate(valid_subnet, patches[:count], chunk)
        per_patch_s = HEIGHT * WIDTH / valid_rate
        per_patch_cpu_s = per_patch_timing["cpu_median_s"] * HEIGHT * WIDTH / count
        label = f"valid: per-patch evaluation (rate on {count} patches, extrapolated)"
    else:
        per_patch = tf.function(
            lambda x: heatmaps.dense_patch_map(valid_subnet, x, PATCH),
            input_signature=[tf.TensorSpec([None, None, 3], tf.float32)],
        )
        per_patch(image[:PATCH, :PATCH])
        slow = []
        per_patch_timing = timed(lambda: slow.append(per_patch(image).numpy()), warmup=0, repeats=1)
        per_patch_s, per_patch_cpu_s = per_patch_timing["median_s"], per_patch_timing["cpu_median_s"]
        valid_rate = HEIGHT * WIDTH / per_patch_s
        error = float(np.abs(heatmaps.heatmap(valid, image)[0] - slow[0][..., 0]).max())
        results["valid_max_abs_error"] = error
        row("valid: one-pass vs per-patch max abs error", error, "", "<= 1e-5", error <= 1e-5)
        label = "valid: per-patch evaluation (dense_patch_map)"
    row(label, per_patch_s, "s")
    row("valid: per-patch achieved", valid_rate * flops_valid / 1e9, "GFLOP/s")
    row("valid: one-pass speed-up over per-patch, wall", per_patch_s / one_pass_s, "x")
    speedup = per_patch_cpu_s / timing["cpu_median_s"]
    row("valid: one-pass speed-up over per-patch, CPU time", speedup, "x",
        f">= {TARGET_ONE_PASS_SPEEDUP:.0f}", speedup >= TARGET_ONE_PASS_SPEEDUP)
    row("same stride-1 map / valid one-pass map", full_same_s / one_pass_s, "x")
    if not quick:
        big = rng.random((1024, 1024, 3), dtype=np.float32)
        timing = heatmap_rate(valid, big)
        row("valid: one-pass 1024x1024 (8 bands)", timing["median_s"], "s")

    # --- Grad-CAM reference, timed in turns with the one-pass map -----------------------------
    comparison = paired(
        lambda: heatmaps.heatmap(valid, image), grad_cam_function(args.dense_units),
        warmup=2, pairs=3 if quick else 7,
    )
    results["one_pass_vs_grad_cam"] = comparison
    grad_cam_s = comparison["b"]["median_s"]
    row(f"Grad-CAM VGG-11 224x224 (dense {args.dense_units}), fwd + bwd", grad_cam_s, "s")
    row("Grad-CAM achieved (forward FLOPs / time)",
        vgg11_forward_flops(224, args.dense_units) / grad_cam_s / 1e9, "GFLOP/s")
    row("valid one-pass map / Grad-CAM, wall time (paired)", 1.0 / comparison["ratio_b_over_a"], "x")
    ratio = 1.0 / comparison["cpu_ratio_b_over_a"]
    row("valid one-pass map / Grad-CAM, CPU time (paired)", ratio, "x", "<= 1", ratio <= 1.0)
    row("same stride-1 map time / Grad-CAM time", full_same_s / grad_cam_s, "x")

    row.report(
        f"bench.heatmap ({'quick' if quick else 'default'}; p = {PATCH}, 7 x 64 convs; "
        f"{HEIGHT}x{WIDTH} unless stated)",
        "heatmap_quick" if quick else "heatmap",
        results,
    )


if __name__ == "__main__":
    main()
