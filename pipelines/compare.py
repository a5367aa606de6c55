"""`patchnet compare`: PatchNet vs CAM vs Grad-CAM on one dataset with masks,
the paper's Table 1 (loss, accuracy) and Table 2 (mask overlap) and its figure.

Stages, each announced as it starts:
  1-3. train (or resume) OUT/patchnet, OUT/cam, OUT/vgg11 with `patchnet train`'s
       code and defaults (a finished run is only loaded; --no-train requires it)
  4.   Table 1: loss and accuracy of each model on the val (and test) split
  5.   Table 2: class-1 maps of every masked image of --mask-split against its mask
  6.   write OUT/table1.{md,csv}, OUT/table2.{md,csv}, OUT/comparison.png,
       OUT/results.json, and the figure to TensorBoard (OUT/logs)

The figure has one row per sampled image (class 1 first, then class 0, like
the paper's): original | mask | PatchNet-p | CAM | Grad-CAM, white = class 1.

K classes (docs/k-classes.md; masks MASKS/<class>/<stem>.png): Table 1 adds
the macro AUROC, Table 2 has one row per map and masked class (each class's
map against that class's masks), and a figure row shows the mask and maps of
the sampled image's own class (its first masked class for an unmasked one).
"""

import csv
import dataclasses
import io
import json
import math
import os

import cv2
import numpy as np
import tensorflow as tf

from patchnet_tf.atomic import atomic_path, atomic_write_text
from patchnet_tf.errors import MissingSplit, PatchNetError
from patchnet_tf.heatmaps import heatmap_to_gray
from patchnet_tf.metrics import format_number, format_percent, mask_metrics
from pipelines import evaluate as evaluation
from pipelines import settings
from pipelines.data import load_dataset
from pipelines.settings import ARCHS

SPLIT_TITLES = {"train": "Training", "val": "Validation", "test": "Test"}


def run_configs(args):
    """The `patchnet train` config of each of the three runs, from compare's flags as settings objects.

    A setting compare has no flag for is `patchnet train`'s default. The baselines take the shared
    settings with their own batch size and learning rate; the model and border patches are PatchNet's
    flags, so the baselines keep train's defaults there (as their stored configs have them).
    """
    flags = vars(args)
    # heatmap_every 0: compare draws its own figure; skip_bad None: compare has no --skip-bad, so a bad
    # file is an error that does not suggest one.
    data = settings.settings_from(settings.DataSettings, flags, skip_bad=None)
    training = settings.settings_from(settings.TrainingSettings, flags, heatmap_every=0)
    patchnet = settings.settings_from(settings.ModelSettings, flags,
                                      stride=args.stride or settings.cpu_stride(args.padding))
    baseline = dataclasses.replace(training, batch_size=args.baseline_batch_size,
                                   learning_rate=args.baseline_learning_rate,
                                   border_patches=settings.TrainingSettings.border_patches)
    configs = {}
    for arch in ARCHS:
        model, run = (patchnet, training) if arch == "patchnet" else (settings.ModelSettings(arch=arch), baseline)
        configs[arch] = settings.train_config(model, data, run, data=args.data, out=os.path.join(args.out, arch))
    return configs


def model_names(patch_size):
    """Row names as in the paper: Table 1 names the network, Table 2 the map."""
    return {
        "patchnet": (f"PatchNet-{patch_size}", f"PatchNet-{patch_size}"),
        "cam": ("CAM", "CAM"),
        "vgg11": ("VGG-11", "Grad-CAM"),
    }


def _stage(number, total, text):
    print(f"[{number}/{total}] {text}", flush=True)


def train_or_load(configs, *, train=True, stage=None):
    """arch -> (model, preprocessing, train config); trains or resumes unless `train` is False."""
    from pipelines import train as training

    runs = {}
    for index, (arch, config) in enumerate(configs.items(), start=1):
        if train:
            if stage:
                stage(index, f"training {arch} -> {config['out']}")
            training.train(config)
        elif stage:
            stage(index, f"loading {arch} from {config['out']}")
        runs[arch] = evaluation.load_run(config["out"])
    return runs


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv_text(header, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def table1(results, names, splits):
    """(markdown, csv) of loss and accuracy per model and split (paper Table 1)."""
    header = ["Model"]
    csv_header = ["model"]
    for split in splits:
        header += [f"{SPLIT_TITLES[split]} Loss", f"{SPLIT_TITLES[split]} Accuracy"]
        csv_header += [f"{split}_loss", f"{split}_accuracy"]
    rows, csv_rows = [], []
    for arch, by_split in results.items():
        row, csv_row = [names[arch][0]], [names[arch][0]]
        for split in splits:
            row += [f"{by_split[split]['loss']:.3f}", format_percent(by_split[split]["accuracy"])]
            csv_row += [f"{by_split[split]['loss']:.6f}", f"{by_split[split]['accuracy']:.6f}"]
        rows.append(row)
        csv_rows.append(csv_row)
    return markdown_table(header, rows), _csv_text(csv_header, csv_rows)


def table1_k(results, names, splits, class_names):
    """(markdown, csv) of loss, accuracy, macro and per-class AUROC per model and split (K classes)."""
    header, csv_header = ["Model", "Split", "Loss", "Accuracy", "Macro AUROC"], ["model", "split", "loss",
                                                                                   "accuracy", "macro_auroc"]
    header += [f"AUROC {name}" for name in class_names]
    csv_header += [f"auroc_{name}" for name in class_names]
    rows, csv_rows = [], []
    for arch, by_split in results.items():
        for split in splits:
            result = by_split[split]
            rows.append([names[arch][0], SPLIT_TITLES[split], f"{result['loss']:.3f}",
                         format_percent(result["accuracy"]), format_number(result["auroc"])]
                        + [format_number(value) for value in result["auroc_per_class"]])
            csv_rows.append([names[arch][0], split, f"{result['loss']:.6f}", f"{result['accuracy']:.6f}",
                             f"{result['auroc']:.6f}"] + [f"{value:.6f}" for value in result["auroc_per_class"]])
    return markdown_table(header, rows), _csv_text(csv_header, csv_rows)


def table2(mask_results, names):
    """(markdown, csv) of the mask metrics per map (paper Table 2)."""
    header = ["Model", "Average Exact Match", "Average Recall", "Average AUROC",
              "Exact Match, Border Band", "Exact Match, Interior"]
    keys = ("exact_match", "recall", "auroc", "exact_match_border", "exact_match_interior")
    if "threshold" not in next(iter(mask_results.values())):  # K classes: arch -> class -> metrics
        return _table2_k(mask_results, names, header, keys)
    rows, csv_rows = [], []
    for arch, metrics in mask_results.items():
        rows.append([names[arch][1]] + [
            format_number(metrics[key]) if key == "auroc" else format_percent(metrics[key]) for key in keys
        ])
        csv_rows.append([names[arch][1]] + [
            "" if math.isnan(metrics[key]) else f"{metrics[key]:.6f}" for key in keys
        ] + [metrics["images"], metrics["recall_images"], metrics["auroc_images"], metrics["threshold"]])
    any_metrics = next(iter(mask_results.values()))
    note = (
        f"\n{any_metrics['images']} images, heatmaps thresholded at {any_metrics['threshold']:g}; "
        f"recall over the {any_metrics['recall_images']} with a non-empty mask, "
        f"AUROC over the {any_metrics['auroc_images']} whose mask has both values; "
        f"the border band is the {any_metrics['border']} pixels along the image border (half a patch).\n"
    )
    csv_header = ["model", *keys, "images", "recall_images", "auroc_images", "threshold"]
    return markdown_table(header, rows) + note, _csv_text(csv_header, csv_rows)


def _table2_k(mask_results, names, header, keys):
    header = header[:1] + ["Class"] + header[1:]
    rows, csv_rows = [], []
    for arch, by_class in mask_results.items():
        for class_name, metrics in by_class.items():
            rows.append([names[arch][1], class_name] + [
                format_number(metrics[key]) if key == "auroc" else format_percent(metrics[key]) for key in keys
            ])
            csv_rows.append([names[arch][1], class_name] + [
                "" if math.isnan(metrics[key]) else f"{metrics[key]:.6f}" for key in keys
            ] + [metrics["images"], metrics["recall_images"], metrics["auroc_images"], metrics["threshold"]])
    metrics = next(iter(next(iter(mask_results.values())).values()))
    note = (
        f"\nEach class's map against that class's masks over {metrics['images']} images (every image of the "
        f"split; a mask is all black on images of other classes), thresholded at {metrics['threshold']:g}; "
        "recall over the images of that class, AUROC over those whose mask has both values; "
        f"the border band is the {metrics['border']} pixels along the image border (half a patch).\n"
    )
    csv_header = ["model", "class", *keys, "images", "recall_images", "auroc_images", "threshold"]
    return markdown_table(header, rows) + note, _csv_text(csv_header, csv_rows)


def sample_indices_k(labels, count, classes, seed=0):
    """Up to `count` indices spread over the classes by turns (class 1, 2, ..., then 0), each class's sorted."""
    rng = np.random.default_rng(seed)
    order = list(range(1, classes)) + [0]
    pools = {label: list(rng.permutation(np.flatnonzero(labels == label))) for label in order}
    picks = {label: [] for label in order}
    while sum(map(len, picks.values())) < count and any(pools.values()):
        for label in order:
            if pools[label] and sum(map(len, picks.values())) < count:
                picks[label].append(int(pools[label].pop(0)))
    return [index for label in order for index in sorted(picks[label])]


def sample_indices(labels, count, seed=0):
    """Up to `count` indices, class 1 first then class 0, as evenly split as the data allows."""
    rng = np.random.default_rng(seed)
    by_class = {label: list(rng.permutation(np.flatnonzero(labels == label))) for label in (1, 0)}
    wanted = {1: (count + 1) // 2, 0: count // 2}
    for label, other in ((1, 0), (0, 1)):  # give a short class's places to the other
        spare = wanted[label] - len(by_class[label])
        if spare > 0:
            wanted[label] -= spare
            wanted[other] += spare
    return [int(index) for label in (1, 0) for index in sorted(by_class[label][: wanted[label]])]


def _cell(array, cell):
    """(H, W) in [0, 1] or (H, W, 3) RGB in [0, 1] -> (cell, cell, 3) uint8 RGB, nearest neighbour."""
    array = np.clip(np.asarray(array, np.float32), 0.0, 1.0)
    if array.ndim == 2:
        array = np.repeat(heatmap_to_gray(array)[..., None], 3, axis=-1)
    else:
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        array = np.round(array * 255).astype(np.uint8)
    return cv2.resize(array, (cell, cell), interpolation=cv2.INTER_NEAREST)


def figure_grid(images, masks, maps, titles, *, cell=128, gap=4, row_labels=None):
    """RGB uint8 grid: one row per image, columns original | mask | each map, titles on top;
    `row_labels` (K classes: the class whose mask and maps a row shows) go on the mask cell."""
    columns = len(maps) + 2
    header = 24
    height = header + len(images) * (cell + gap)
    width = columns * (cell + gap) - gap
    grid = np.full((height, width, 3), 255, np.uint8)
    for column, title in enumerate(["Original", "Mask"] + list(titles)):
        left = column * (cell + gap)
        scale = 0.45
        (text_width, _), _ = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        origin = (left + max(0, (cell - text_width) // 2), 16)
        cv2.putText(grid, title, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    for row, index in enumerate(range(len(images))):
        top = header + row * (cell + gap)
        cells = [images[index], masks[index].astype(np.float32)] + [heat[index] for heat in maps]
        for column, content in enumerate(cells):
            left = column * (cell + gap)
            grid[top : top + cell, left : left + cell] = _cell(content, cell)
        if row_labels is not None:
            left = cell + gap
            cv2.rectangle(grid, (left, top), (left + 8 + 8 * len(row_labels[row]), top + 16), (255, 255, 255), -1)
            cv2.putText(grid, row_labels[row], (left + 3, top + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                        cv2.LINE_AA)
    return grid


def write_png(path, rgb):
    with atomic_path(path) as temporary:
        if not cv2.imwrite(temporary, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
            raise PatchNetError(f"{path}: could not write the figure")


def log_figure(log_dir, rgb, step=0):
    with tf.summary.create_file_writer(log_dir).as_default():
        tf.summary.image("comparison", rgb[None], step=step,
                         description="original | mask | PatchNet | CAM | Grad-CAM; white = class 1")


def compare(args):
    """Runs every stage; returns the results dict written to OUT/results.json."""
    # Everything the three runs and the tables need is checked before the first run trains.
    configs = run_configs(args)
    if not args.no_train:
        from pipelines.train import check_settings

        for config in configs.values():
            check_settings(config)
    masks_dir = args.masks or os.path.join(args.data, "masks")
    if not os.path.isdir(masks_dir):
        raise PatchNetError(f"{masks_dir}: no mask folder (compare needs masks; pass --masks DIR)")
    dataset = load_dataset(args.data, seed=args.seed)
    if args.mask_split not in dataset.splits:
        raise PatchNetError(f"{args.data}: no {args.mask_split} split for --mask-split {args.mask_split} "
                            f"(it has {', '.join(sorted(dataset.splits))})")
    class_names = list(dataset.class_names)
    k_classes = len(class_names) > 2
    masked = evaluation.masked_classes(masks_dir, class_names) if k_classes else None
    mask_split_paths = dataset.splits[args.mask_split].paths  # a missing mask is named now, not after training
    if k_classes:
        evaluation.class_mask_pairs(mask_split_paths, masks_dir, masked)
    else:
        evaluation.mask_pairs(mask_split_paths, masks_dir)
    total = len(ARCHS) + 3
    stage = lambda number, text: _stage(number, total, text)  # noqa: E731
    runs = train_or_load(configs, train=not args.no_train, stage=stage)
    names = model_names(args.patch_size)

    stage(len(ARCHS) + 1, "Table 1: loss and accuracy")
    results, splits = {}, None
    for arch, (model, preprocessing, train_config) in runs.items():
        results[arch] = {}
        available = [split for split in ("val", "test") if _has_split(args.data, preprocessing, split, train_config)]
        splits = available if splits is None else [split for split in splits if split in available]
        for split in available:
            images = evaluation.load_split(args.data, preprocessing, split, train_config)
            results[arch][split] = evaluation.evaluate_model(
                model, preprocessing, images, batch_size=args.eval_batch_size
            )
            print(f"  {names[arch][0]:12s} {split}: loss {results[arch][split]['loss']:.3f}  "
                  f"accuracy {format_percent(results[arch][split]['accuracy'])}", flush=True)

    stage(len(ARCHS) + 2, f"Table 2: maps against the {args.mask_split} masks")
    mask_results, maps, inputs, masks, labels = {}, [], None, None, None
    for arch, (model, preprocessing, train_config) in runs.items():
        split = evaluation.load_split(args.data, preprocessing, args.mask_split, train_config)
        if k_classes:
            pairs = evaluation.class_mask_pairs(split.paths, masks_dir, masked)
        else:
            pairs = evaluation.mask_pairs(split.paths, masks_dir)
        model_inputs, heatmaps, model_masks = evaluation.masked_heatmaps(
            model, preprocessing, pairs, heatmap_stride=args.heatmap_stride,
            batch_size=args.eval_batch_size, progress=f"  {names[arch][1]} maps",
        )
        if k_classes:
            mask_results[arch] = evaluation.class_mask_metrics(
                heatmaps, model_masks, class_names, masked, threshold=args.threshold, border=args.patch_size // 2)
        else:
            mask_results[arch] = mask_metrics(heatmaps, model_masks, threshold=args.threshold,
                                              border=args.patch_size // 2)
        maps.append(heatmaps)
        if inputs is None:
            labels = split.labels[[split.paths.index(path) for path, _ in pairs]] if k_classes else split.labels
            inputs, masks = model_inputs, model_masks
        elif heatmaps.shape[1:] != maps[0].shape[1:]:
            raise PatchNetError("compare needs the three models at the same image size")

    stage(len(ARCHS) + 3, f"writing tables and figure to {args.out}")
    table1_md, table1_csv = (table1_k(results, names, splits, class_names) if k_classes
                             else table1(results, names, splits))
    table2_md, table2_csv = table2(mask_results, names)
    if k_classes:
        picks = sample_indices_k(np.asarray(labels), args.samples, len(class_names), args.seed)
        # Each row: the mask and the maps of the image's own class (its first masked class if unmasked).
        columns = [masked.index(class_names[label]) if class_names[label] in masked else 0 for label in labels[picks]]
        shown = [class_names.index(masked[column]) for column in columns]
        masks = np.stack([masks[index][..., column] for index, column in zip(picks, columns)])
        maps = [np.stack([heat[index][..., klass] for index, klass in zip(picks, shown)]) for heat in maps]
        picked_inputs = inputs[picks]
        row_labels = [f"{class_names[label]}: {class_names[klass]} map" for label, klass in zip(labels[picks], shown)]
    else:
        picks = sample_indices(np.asarray(labels), args.samples, args.seed)
        masks, maps, picked_inputs = masks[picks], [heat[picks] for heat in maps], inputs[picks]
        row_labels = None
    grid = figure_grid(picked_inputs, masks, maps, [names[arch][1] for arch in runs], cell=args.cell,
                       row_labels=row_labels)
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "table1.md"), table1_md)
    atomic_write_text(os.path.join(args.out, "table1.csv"), table1_csv)
    atomic_write_text(os.path.join(args.out, "table2.md"), table2_md)
    atomic_write_text(os.path.join(args.out, "table2.csv"), table2_csv)
    write_png(os.path.join(args.out, "comparison.png"), grid)
    log_figure(os.path.join(args.out, "logs"), grid)
    summary = {
        "data": args.data,
        "masks": masks_dir,
        "mask_split": args.mask_split,
        "table1": results,
        "table2": mask_results,
        "figure_images": [int(index) for index in picks],
    }
    atomic_write_text(os.path.join(args.out, "results.json"), json.dumps(summary, indent=2, default=float))
    print("\nTable 1\n\n" + table1_md + "\nTable 2\n\n" + table2_md)
    print(f"figure: {os.path.join(args.out, 'comparison.png')}; "
          f"TensorBoard: tensorboard --logdir {os.path.join(args.out, 'logs')}")
    return summary


def _has_split(data, preprocessing, split, train_config):
    try:
        evaluation.load_split(data, preprocessing, split, train_config)
    except MissingSplit:
        return False
    return True


def run(args):
    compare(args)
