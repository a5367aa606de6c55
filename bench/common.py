"""Shared benchmark helpers: a matmul reference, median timing, FLOP counts, tables + JSON.

Absolute times on a shared 2-core machine drift by tens of percent from run
to run, so every benchmark also reports ratios measured in the same run
(against a large matmul, or against a plain batched forward).
"""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

RESULTS = Path(__file__).resolve().parent / "results"


def timed(function, *, warmup=1, repeats=3):
    """Median wall time in seconds of `function()` after `warmup` calls (tracing, oneDNN setup)."""
    for _ in range(warmup):
        function()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        function()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "runs_s": times,
        "cpu_median_s": statistics.median(cpu_times),
    }


def matmul_gflops(size=2048, repeats=5):
    """GFLOP/s of a float32 size x size matmul: the machine's practical peak for this run."""
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])
    product = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    timing = timed(lambda: product().numpy(), warmup=2, repeats=repeats)
    return 2.0 * size**3 / timing["median_s"] / 1e9


def conv_flops(out_pixels, kernel, channels_in, channels_out):
    """Multiply-adds counted as 2 FLOPs; biases and activations left out (< 1 %)."""
    return 2.0 * out_pixels * kernel * kernel * channels_in * channels_out


def subnet_patch_flops(patch_size, *, channels=3, filters=64, conv_layers=7, padding="same"):
    """FLOPs of the subnet on one p x p patch (conv stack, per-filter linear map, head)."""
    flops, size, channels_in = 0.0, patch_size, channels
    for _ in range(conv_layers):
        if padding == "valid":
            size -= 2
        flops += conv_flops(size * size, 3, channels_in, filters)
        channels_in = filters
    return flops + 2.0 * size * size * filters + 2.0 * filters


def one_pass_flops(height, width, patch_size, *, channels=3, filters=64, conv_layers=7, stride=1):
    """FLOPs of the one-pass valid map of an H x W image (padded by p - 1, one band)."""
    rows = (height + stride - 1) // stride
    cols = (width + stride - 1) // stride
    size_y, size_x = (rows - 1) * stride + patch_size, (cols - 1) * stride + patch_size
    flops, channels_in = 0.0, channels
    for _ in range(conv_layers):
        size_y, size_x = size_y - 2, size_x - 2
        flops += conv_flops(size_y * size_x, 3, channels_in, filters)
        channels_in = filters
    positions = patch_size - 2 * conv_layers
    linear = 2.0 * (size_y - positions + 1) * (size_x - positions + 1) * positions**2 * filters
    return flops + linear + 2.0 * rows * cols * filters


def environment():
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_average_at_start": os.getloadavg(),
        "argv": sys.argv[1:],
    }


def print_table(title, rows, columns):
    """rows: list of dicts; columns: list of (key, header)."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_format(row.get(key, "")) for key, _ in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for index, line in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _format(value):
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def write_json(name, payload):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    temporary.replace(path)
    print(f"\nwrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def vgg11(input_size=224, dense_units=4096, classes=1):
    """Plain VGG-11 (configuration A, no batch norm) split as (features, head) for Grad-CAM."""
    import keras

    features = keras.Sequential(name="vgg11_features")
    features.add(keras.Input((input_size, input_size, 3)))
    for width in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512):
        if width == "M":
            features.add(keras.layers.MaxPooling2D(2))
        else:
            features.add(keras.layers.Conv2D(width, 3, padding="same", activation="relu"))
    head = keras.Sequential(
        [
            keras.Input(features.output_shape[1:]),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(dense_units, activation="relu"),
            keras.layers.Dense(dense_units, activation="relu"),
            keras.layers.Dense(classes),
        ],
        name="vgg11_head",
    )
    return features, head


def vgg11_forward_flops(input_size=224, dense_units=4096, classes=1):
    flops, size, channels_in = 0.0, input_size, 3
    for width in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if width == "M":
            size //= 2
        else:
            flops += conv_flops(size * size, 3, channels_in, width)
            channels_in = width
    flat = size * size * channels_in
    return flops + 2.0 * (flat * dense_units + dense_units * dense_units + dense_units * classes)


def paired(function_a, function_b, *, warmup=1, pairs=3):
    """Interleaved timings of two functions and the median of their per-pair ratios b / a.

    On a shared machine the load changes between runs; timing a and b back
    to back, pair after pair, keeps the ratio honest when absolute times are
    not. Process CPU time (all threads) is reported beside wall time: when
    other jobs take the cores, wall time swings by 2-3x while CPU time per
    call stays within a few percent, so `cpu_ratio_b_over_a` is the steadier
    ratio; on an idle machine the two agree.
    """
    for _ in range(warmup):
        function_a()
        function_b()
    runs = {"a": ([], []), "b": ([], [])}
    for _ in range(pairs):
        for key, function in (("a", function_a), ("b", function_b)):
            start, cpu_start = time.perf_counter(), time.process_time()
            function()
            runs[key][0].append(time.perf_counter() - start)
            runs[key][1].append(time.process_time() - cpu_start)
    (wall_a, cpu_a), (wall_b, cpu_b) = runs["a"], runs["b"]
    return {
        "a": {"median_s": statistics.median(wall_a), "runs_s": wall_a, "cpu_median_s": statistics.median(cpu_a)},
        "b": {"median_s": statistics.median(wall_b), "runs_s": wall_b, "cpu_median_s": statistics.median(cpu_b)},
        "ratio_b_over_a": statistics.median(b / a for a, b in zip(wall_a, wall_b)),
        "cpu_ratio_b_over_a": statistics.median(b / a for a, b in zip(cpu_a, cpu_b)),
    }


class MetricRows(list):
    """The metric | value | unit | target | met table; `self(...)` adds and echoes a row."""

    def __call__(self, metric, value, unit="", target="", ok=""):
        self.append({"metric": metric, "value": value, "unit": unit, "target": target, "ok": ok})
        print(f"  {metric}: {value:.4g} {unit}", flush=True)

    def report(self, title, name, results):
        """Prints the table and writes bench/results/<name>.json with the rows in `results`."""
        results["rows"] = list(self)
        columns = [("metric", "metric"), ("value", "measured"), ("unit", "unit"), ("target", "target"), ("ok", "met")]
        print_table(title, self, columns)
        write_json(name, results)

    def matmul_reference(self):
        """Measures and records the large-matmul GFLOP/s every ratio is taken against."""
        peak = matmul_gflops()
        self("matmul 2048^2 (reference)", peak, "GFLOP/s")
        return peak
