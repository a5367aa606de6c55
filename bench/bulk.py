"""Bulk heatmaps: `patchnet bulk` on Beam's multi-process DirectRunner against one `patchnet heatmap` process.

    python -m bench.bulk            # 500 images at 192 x 256 (about 10 minutes on 2 cores)
    python -m bench.bulk --quick    # 60 images
    python -m bench.bulk --tf-threads 2   # bulk's workers with TF's thread pools at machine size
    python -m bench.bulk --precision bfloat16 --images 200   # both commands' maps in bfloat16

Both commands run as a user runs them (a fresh process each, model loading
and Beam's worker start-up included), twice, in the order heatmap, bulk,
bulk, heatmap (a load that drifts hits both alike), on the same folder of
random 192 x 256 PNGs, with the paper's ISIC subnet in its exact one-pass form (p = 21,
7 x 64 3x3 convs, padding="valid", random weights: speed does not depend on
them). Reported: images/s of each, their ratio in this run, the CPU time of
each command and its children, the FLOPs per image of each (both compute
the map and read the probability from it; bulk used to classify every image
with a second model call, which would add the classifier's patches), that
both wrote the same PNG bytes, and the time of a re-run of bulk with every
output present (no model work). From the CPU time per image it projects
how long a million images would take on 1, 8 and 64 bulk workers of one
core each: CPU time / workers, the model work scaling linearly, plus one
worker start-up (model load) per worker; reading inputs and writing PNGs
to shared storage, and the driver's final results.csv, do not shrink with
more workers and are not in it.
Writes bench/results/bulk[_quick][_bfloat16].json.
"""

import argparse
import filecmp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import keras
import numpy as np

from bench.common import MetricRows, environment, one_pass_flops, subnet_patch_flops
from patchnet_tf import build_patchnet
from patchnet_tf.preprocessing import Preprocessing

PATCH = 21
HEIGHT, WIDTH = 192, 256


def write_images(folder, count):
    """`count` smooth random colour images (PNG) at 192 x 256."""
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    for index in range(count):
        small = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
        image = cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(os.path.join(folder, f"{index:05d}.png"), image)


def timed_command(argv):
    """(wall seconds, CPU seconds of the command and every process it waited for) of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        sys.exit(f"bench.bulk: {' '.join(argv)} failed:\n{completed.stdout[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, completed.stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 images instead of 500")
    parser.add_argument("--images", type=int, default=None, help="this many images (default 500, quick 60)")
    parser.add_argument("--precision", choices=("float32", "bfloat16", "auto"), default="float32",
                        help="both commands' --precision")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DirectRunner worker processes")
    parser.add_argument("--tf-threads", type=int, default=None,
                        help="bulk's --tf-threads (default: bulk's own, the cores divided among the workers)")
    args = parser.parse_args(argv)
    count = args.images or (60 if args.quick else 500)
    results = {"environment": environment(), "quick": args.quick, "images": count, "image": [HEIGHT, WIDTH],
               "workers": args.workers, "tf_threads": args.tf_threads, "precision": args.precision,
               "model": "PatchNet p = 21, 7 x 64 3x3 convs, padding valid (one-pass map), random weights"}
    row = MetricRows()
    root = tempfile.mkdtemp(prefix="bench-bulk-")
    try:
        images, run = os.path.join(root, "images"), os.path.join(root, "run")
        write_images(images, count)
        keras.utils.set_random_seed(0)
        os.makedirs(run)
        model = build_patchnet(PATCH, padding="valid")
        model.save(os.path.join(run, "model.keras"))
        patches = keras.Model(model.input, model.get_layer("patches").output)(np.zeros((1, HEIGHT, WIDTH, 3))).shape[1]
        Preprocessing(image_size=(HEIGHT, WIDTH)).save(run)
        patchnet = [sys.executable, "-m", "patchnet_tf"]

        def heatmap_command(out):
            return patchnet + ["heatmap", images, "--model", run, "--out", os.path.join(root, out),
                               "--precision", args.precision]

        def bulk_command(out):
            return patchnet + ["bulk", images, "--model", run, "--out", os.path.join(root, out),
                               "--workers", str(args.workers), "--precision", args.precision] + (
                                   ["--tf-threads", str(args.tf_threads)] if args.tf_threads else [])

        # heatmap, bulk, bulk, heatmap: a load that drifts during the run hits both commands alike.
        single_a, bulk_a = timed_command(heatmap_command("heatmap-a")), timed_command(bulk_command("bulk-a"))
        bulk_b, single_b = timed_command(bulk_command("bulk-b")), timed_command(heatmap_command("heatmap-b"))
        rerun_wall, _, rerun_log = timed_command(bulk_command("bulk-a"))

        pngs = sorted(name for name in os.listdir(os.path.join(root, "heatmap-a")) if name.endswith(".png"))
        _, mismatch, errors = filecmp.cmpfiles(os.path.join(root, "heatmap-a"), os.path.join(root, "bulk-a"),
                                               pngs, shallow=False)
        walls = {"heatmap": [single_a[0], single_b[0]], "bulk": [bulk_a[0], bulk_b[0]]}
        cpus = {"heatmap": [single_a[1], single_b[1]], "bulk": [bulk_a[1], bulk_b[1]]}
        results.update(wall_s=walls, cpu_s=cpus, rerun_wall_s=rerun_wall,
                       bulk_log_tail=bulk_a[2].splitlines()[-3:], rerun_log_tail=rerun_log.splitlines()[-1:])
        for index in range(2):
            row(f"patchnet heatmap, one process, run {index + 1}", count / walls["heatmap"][index], "images/s")
            row(f"patchnet bulk, DirectRunner {args.workers} processes, run {index + 1}",
                count / walls["bulk"][index], "images/s")
        ratios = [single / bulk for single, bulk in zip(walls["heatmap"], walls["bulk"])]
        row("bulk / heatmap throughput, pair 1 (heatmap then bulk)", ratios[0], "x")
        row("bulk / heatmap throughput, pair 2 (bulk then heatmap)", ratios[1], "x")
        row("patchnet heatmap CPU time per image", statistics.mean(cpus["heatmap"]) / count, "s")
        row("patchnet bulk CPU time per image (driver + workers)", statistics.mean(cpus["bulk"]) / count, "s")
        row("bulk / heatmap CPU time per image", sum(cpus["bulk"]) / sum(cpus["heatmap"]), "x")
        for command in ("heatmap", "bulk"):
            row(f"{command} CPU seconds per 1,000 images ({args.precision})", 1000 * statistics.mean(cpus[command]) / count, "s")
        # One million images on N one-core workers: the model work divides; each worker pays one start-up
        # (a process that loads the model: the re-run's time, which does no model work, bounds it).
        bulk_cpu_per_image = statistics.mean(cpus["bulk"]) / count
        for workers in (1, 8, 64):
            row(f"1,000,000 images on {workers} one-core bulk worker(s), projected",
                (1e6 * bulk_cpu_per_image / workers + rerun_wall) / 3600, "h")
        # The results.csv probability is read from the map; a classify pass would add the model on its patches.
        map_flops = one_pass_flops(HEIGHT, WIDTH, PATCH)
        row("bulk / heatmap FLOPs per image (the probability read from the map)", 1.0, "x")
        row(f"FLOPs a second classify pass would add ({patches} patches), relative to the map",
            patches * subnet_patch_flops(PATCH, padding="valid") / map_flops, "x")
        row("PNGs byte-identical to patchnet heatmap's", float(len(pngs) - len(mismatch) - len(errors)), "files",
            f"{2 * count}", len(pngs) == 2 * count and not mismatch and not errors)
        row("bulk re-run, every output present (no model work)", rerun_wall, "s")
        row.report(f"Bulk heatmaps: {count} images at {HEIGHT} x {WIDTH}, p = {PATCH} valid",
                   "bulk" + ("_quick" if args.quick else "") + ("" if args.precision == "float32" else f"_{args.precision}"),
                   results)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
