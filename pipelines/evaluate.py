"""`patchnet evaluate`: loss, accuracy and AUROC of a trained model on a folder
dataset's val (or test) split, plus the paper's mask metrics with --masks DIR.

Works for every model `patchnet train` writes (PatchNet, CAM, VGG-11): the
class-1 map comes from `patchnet_tf.explain.explain`. Classification metrics
are computed from the predicted probabilities: loss is Keras's binary
cross-entropy, accuracy thresholds at 0.5, AUROC is exact (scikit-learn),
not the 200-bucket approximation `keras.metrics.AUC` logs during training.

K-class models (docs/k-classes.md): categorical cross-entropy, accuracy of
the most probable class, one-vs-rest AUROC per class and their mean (macro,
reported as "auroc"), and the confusion matrix. Their masks are
MASKS/<class>/<stem>.png, scored against that class's map, per class.
"""

import json
import os

import keras
import numpy as np
from sklearn.metrics import roc_auc_score

from patchnet_tf.atomic import atomic_write_text, check_output_path
from patchnet_tf.errors import MissingSplit, PatchNetError, PositiveClassMismatch
from patchnet_tf.explain import explain
from patchnet_tf.metrics import (
    confusion_matrix,
    format_confusion_matrix,
    format_number,
    format_percent,
    mask_metrics,
    read_mask,
)
from patchnet_tf.precision import at_precision
from patchnet_tf.runs import MODEL_FILE, load_trained_model, read_train_config
from pipelines.data import image_dataset, load_dataset, mask_path_for, read_image
from pipelines.progress import Progress
from pipelines.settings import PAPER


def load_run(model_path):
    """(model, preprocessing, train config or {}) from a run folder or a model file."""
    model, preprocessing = load_trained_model(model_path)
    path = os.path.join(model_path, MODEL_FILE) if os.path.isdir(model_path) else model_path
    return model, preprocessing, read_train_config(os.path.dirname(path))


def load_split(data, preprocessing, split, train_config=None):
    """The split of a folder dataset, classes ordered as the model was trained."""
    # A model file without a run folder, or a run saved before a setting existed: train's defaults.
    train_config = {**PAPER, **(train_config or {})}
    is_csv = data.lower().endswith(".csv")
    try:
        dataset = load_dataset(
            data,
            positive_class=None if is_csv or len(preprocessing.class_names) > 2 else preprocessing.class_names[-1],
            image_dir=train_config["images"],
            isic_task=train_config["isic_task"],
            val_fraction=train_config["val_fraction"],
            seed=train_config["seed"],
        )
    except PositiveClassMismatch as error:
        raise PatchNetError(
            f"{data}: its classes differ from the model's {', '.join(preprocessing.class_names)} ({error})"
        ) from None
    if tuple(dataset.class_names) != tuple(preprocessing.class_names):
        raise PatchNetError(
            f"{data}: classes {', '.join(dataset.class_names)} differ from the model's "
            f"{', '.join(preprocessing.class_names)}"
        )
    if split not in dataset.splits:
        raise MissingSplit(f"{data}: no {split!r} split (expected a {os.path.join(data, split)} folder)")
    return dataset.splits[split]


def classification_metrics(labels, probabilities):
    """loss (binary cross-entropy), accuracy (at 0.5), AUROC (NaN with one class).

    (N, K) probabilities of a K-class model: categorical cross-entropy,
    accuracy of the argmax, auroc_per_class (one-vs-rest, NaN for a class
    absent or alone in the labels), auroc their mean over the defined ones,
    and confusion_matrix (rows true, columns predicted).
    """
    probabilities = np.asarray(probabilities, np.float32)
    if probabilities.ndim == 2 and probabilities.shape[1] > 1:
        return _k_class_metrics(np.asarray(labels, np.int64).reshape(-1), probabilities)
    labels = np.asarray(labels, np.float32).reshape(-1)
    probabilities = np.asarray(probabilities, np.float32).reshape(-1)
    loss = float(np.mean(keras.ops.convert_to_numpy(
        keras.losses.binary_crossentropy(labels[:, None], probabilities[:, None])
    )))
    accuracy = float(np.mean((probabilities > 0.5) == (labels > 0.5)))
    auroc = float(roc_auc_score(labels, probabilities)) if len(np.unique(labels)) == 2 else float("nan")
    return {"loss": loss, "accuracy": accuracy, "auroc": auroc, "count": int(len(labels))}


def _k_class_metrics(labels, probabilities):
    classes = probabilities.shape[1]
    one_hot = np.eye(classes, dtype=np.float32)[labels]
    loss = float(np.mean(keras.ops.convert_to_numpy(keras.losses.categorical_crossentropy(one_hot, probabilities))))
    per_class = [
        float(roc_auc_score(one_hot[:, klass], probabilities[:, klass]))
        if 0 < one_hot[:, klass].sum() < len(labels) else float("nan")
        for klass in range(classes)
    ]
    defined = [value for value in per_class if not np.isnan(value)]
    return {
        "loss": loss,
        "accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
        "auroc": float(np.mean(defined)) if defined else float("nan"),
        "auroc_per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, probabilities.argmax(axis=1), classes).tolist(),
        "count": int(len(labels)),
    }


def predict(model, split, preprocessing, batch_size=16):
    """P(class 1) for every image of the split, in order; (N, K) probabilities for a K-class model."""
    # skip_bad=None: evaluate and compare have no --skip-bad to suggest.
    dataset = image_dataset(split, preprocessing, batch_size, skip_bad=None).map(lambda images, labels: images)
    probabilities = np.asarray(model.predict(dataset, verbose=0), np.float32)
    return probabilities.reshape(-1) if probabilities.shape[-1] == 1 else probabilities


def mask_pairs(image_paths, mask_dir, *, skip_missing=None):
    """[(image path, mask path)] matched by file stem in a flat folder; an image without
    a mask is an error naming it, or with `skip_missing` is left out.

    skip_missing=None: the command has no --skip-unmasked (compare, demo), so the error does not
    suggest it; False: it does (evaluate)."""
    if not os.path.isdir(mask_dir):
        raise PatchNetError(f"{mask_dir}: no such mask folder")
    pairs = []
    for image_path in image_paths:
        mask_path = mask_path_for(image_path, mask_dir)
        if mask_path is None:
            if skip_missing:
                continue
            stem = os.path.splitext(os.path.basename(image_path))[0]
            hint = "" if skip_missing is None else " (--skip-unmasked leaves such images out of the mask metrics)"
            raise PatchNetError(f"{image_path}: no mask {os.path.join(mask_dir, stem + '.png')}{hint}")
        pairs.append((image_path, mask_path))
    return pairs


def masked_heatmaps(model, preprocessing, pairs, *, heatmap_stride=1, batch_size=16, progress=None):
    """For (image path, mask path) pairs: (images, heatmaps, masks), all at the model input size.

    The images are as a person sees them ([0, 1], before normalization).
    Masks are resized with nearest neighbour (a resized mask stays binary); `progress` is a
    label for a progress bar, or None for none.
    """
    size = tuple(preprocessing.image_size)
    bar = Progress(len(pairs), "image", progress.strip()) if progress and pairs else None
    inputs, heatmaps, masks = [], [], []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        images = []
        for image_path, mask_paths in batch:
            image = read_image(image_path, preprocessing.channels)
            if isinstance(mask_paths, str):
                masks.append(read_mask(mask_paths, size, image_shape=image.shape))
            else:  # K classes: one mask per class, (H, W, K)
                masks.append(np.stack([read_mask(path, size, image_shape=image.shape) for path in mask_paths], -1))
            images.append(np.asarray(preprocessing.prepare(image), np.float32))
        images = np.stack(images)
        inputs.append(images)
        for image in preprocessing.normalize(images).numpy():  # one at a time: progress per image
            heatmaps.append(explain(model, image[None], stride=heatmap_stride))
            if bar is not None:
                bar.add(1)
    if not pairs:
        empty = np.zeros((0, *size), np.float32)
        return np.zeros((0, *size, preprocessing.channels), np.float32), empty, empty.astype(bool)
    return np.concatenate(inputs), np.concatenate(heatmaps), np.stack(masks)


def masked_classes(masks_dir, class_names):
    """The classes of a K-class model that have a mask folder MASKS/<class>/; an error when none has."""
    if not os.path.isdir(masks_dir):
        raise PatchNetError(f"{masks_dir}: no such mask folder")
    classes = [name for name in class_names if os.path.isdir(os.path.join(masks_dir, name))]
    if not classes:
        raise PatchNetError(
            f"{masks_dir}: no class folder ({', '.join(class_names)}); K-class masks are "
            f"{os.path.join(masks_dir, '<class>', '<stem>.png')}"
        )
    return classes


def class_mask_pairs(image_paths, masks_dir, classes, *, skip_missing=None):
    """[(image path, [mask path per class])] for images with a mask in every MASKS/<class>/ of `classes`."""
    by_class = [dict(mask_pairs(image_paths, os.path.join(masks_dir, name), skip_missing=skip_missing))
                for name in classes]
    return [(path, [masks[path] for masks in by_class]) for path in image_paths
            if all(path in masks for masks in by_class)]


def class_mask_metrics(heatmaps, masks, class_names, classes, *, threshold=0.5, border=None):
    """class name -> mask_metrics of that class's map against its masks (the output of masked_heatmaps)."""
    return {
        name: mask_metrics(heatmaps[..., class_names.index(name)], masks[..., column], threshold=threshold,
                           border=border)
        for column, name in enumerate(classes)
    }


def evaluate_model(
    model,
    preprocessing,
    split,
    *,
    masks_dir=None,
    threshold=0.5,
    heatmap_stride=1,
    skip_unmasked=False,
    batch_size=16,
    progress=None,
):
    """Metrics of `model` on `split`: a dict with loss, accuracy, auroc, count and,
    with `masks_dir`, "masks": mask_metrics(...) over the split's masked images."""
    if len(split) == 0:
        raise PatchNetError("the split to evaluate holds no images")
    if masks_dir is not None:  # before the predictions: a missing mask fails in a second, not after them
        class_names = list(preprocessing.class_names)
        classes = masked_classes(masks_dir, class_names) if len(class_names) > 2 else None
        if classes is None:
            pairs = mask_pairs(split.paths, masks_dir, skip_missing=skip_unmasked)
        else:
            pairs = class_mask_pairs(split.paths, masks_dir, classes, skip_missing=skip_unmasked)
        if not pairs:
            raise PatchNetError(f"{masks_dir}: no mask matches an image of the split")
    results = classification_metrics(split.labels, predict(model, split, preprocessing, batch_size))
    if masks_dir is not None:
        _, heatmaps, masks = masked_heatmaps(
            model, preprocessing, pairs, heatmap_stride=heatmap_stride, batch_size=batch_size,
            progress=progress,
        )
        if classes is None:
            results["masks"] = mask_metrics(heatmaps, masks, threshold=threshold)
        else:
            results["class_masks"] = class_mask_metrics(heatmaps, masks, class_names, classes, threshold=threshold)
    return results


def evaluate(model_path, data, *, split="val", precision="float32", **options):
    """`patchnet evaluate` as a function: loads the run, evaluates one split, the model computing at
    `precision` (`patchnet_tf.precision.at_precision`)."""
    model, preprocessing, train_config = load_run(model_path)
    model = at_precision(model, precision)
    images = load_split(data, preprocessing, split, train_config)
    results = evaluate_model(model, preprocessing, images, **options)
    results["split"] = split
    results["class_names"] = list(preprocessing.class_names)
    return results


def _format_masks(masks, title="masks"):
    return (
        f"{title} (threshold {masks['threshold']:g}, {masks['images']} images): "
        f"exact match {format_percent(masks['exact_match'])}  "
        f"recall {format_percent(masks['recall'])} ({masks['recall_images']} with a non-empty mask)  "
        f"AUROC {format_number(masks['auroc'])} ({masks['auroc_images']} with both values)"
    )


def format_results(results):
    macro = "macro AUROC" if "auroc_per_class" in results else "AUROC"
    lines = [
        f"{results.get('split', 'split')}: {results['count']} images  "
        f"loss {results['loss']:.4f}  accuracy {format_percent(results['accuracy'])}  "
        f"{macro} {format_number(results['auroc'])}"
    ]
    if "auroc_per_class" in results:
        names = results.get("class_names") or [str(index) for index in range(len(results["auroc_per_class"]))]
        lines.append("AUROC per class (one vs rest): " + "  ".join(
            f"{name} {format_number(value)}" for name, value in zip(names, results["auroc_per_class"])))
        lines.append("confusion matrix (rows: true class, columns: predicted class):")
        lines.append(format_confusion_matrix(np.asarray(results["confusion_matrix"]), names))
    masks = results.get("masks")
    if masks:
        lines.append(_format_masks(masks))
    for name, masks in results.get("class_masks", {}).items():
        lines.append(_format_masks(masks, f"masks of {name}"))
    return "\n".join(lines)


def run(args):
    if args.json:
        check_output_path(args.json, "--json", folder=False)
    results = evaluate(
        args.model,
        args.data,
        split=args.split,
        precision=args.precision,
        masks_dir=args.masks,
        threshold=args.threshold,
        heatmap_stride=args.heatmap_stride,
        skip_unmasked=args.skip_unmasked,
        batch_size=args.batch_size,
        progress="heatmaps for the mask metrics",
    )
    print(format_results(results))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2, allow_nan=True))
        print(f"wrote {args.json}")
