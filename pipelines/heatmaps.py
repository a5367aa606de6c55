"""`patchnet heatmap`: heatmap PNGs for images or a folder of images.

For each image, `<stem>-heatmap.png` (grayscale, white = class 1 evidence)
and `<stem>-overlay.png` (colour map over the preprocessed image); with
`--filters`, `<stem>-filters.png`, a grid of the subnet's tanh feature maps.
A K-class model (docs/k-classes.md) writes `<stem>-heatmap-<class>.png` and
`<stem>-overlay-<class>.png` per class (white = that class) and
`<stem>-classes.png`, every class's evidence in one colour map (class 0 black,
then red, green, blue, ...: the probability-weighted mix of the class colours).

It also prints each image's probability and label, as `patchnet bulk`'s
results.csv has them, read from the map (`probability_from_map`) at no extra
cost wherever the map holds the classifier's patches.
"""

import os

import numpy as np

from patchnet_tf.atomic import check_output_path, write_png
from patchnet_tf.baselines import arch_of
from patchnet_tf.errors import PatchNetError
from patchnet_tf.explain import explain
from patchnet_tf.heatmaps import (
    filter_heatmaps,
    heatmap_to_gray,
    output_stems,
    probability_from_map,
    write_heatmap_pngs,
)
from patchnet_tf.precision import at_precision
from patchnet_tf.runs import load_trained_model
from pipelines.data import IMAGE_EXTENSIONS, read_image
from pipelines.progress import Progress


def list_images(inputs):
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for directory, folders, names in os.walk(item):
                folders[:] = [folder for folder in folders if folder != "masks"]  # a dataset's masks are not inputs
                found += [os.path.join(directory, name) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]
            found.sort()
            if not found:
                raise PatchNetError(f"{item}: no images in this folder")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise PatchNetError(f"{item}: no such file or folder")
    return paths


def filter_grid(maps):
    """(H, W, F) tanh maps in [-1, 1] -> one uint8 mosaic, 8 maps a row."""
    height, width, count = maps.shape
    columns = min(8, count)
    rows = -(-count // columns)
    grid = np.zeros((rows * (height + 1), columns * (width + 1)), np.uint8)
    for index in range(count):
        top, left = (index // columns) * (height + 1), (index % columns) * (width + 1)
        grid[top : top + height, left : left + width] = heatmap_to_gray((maps[..., index] + 1) / 2)
    return grid


def prepare_image(path, preprocessing):
    """An image file -> the [0, 1] (H, W, C) image a person sees, at model size (normalize it for the model)."""
    return preprocessing.prepare(read_image(path, preprocessing.channels)).numpy()


def classification(probability, class_names):
    """(probability, label, class name) of one image's model output, as results.csv and the classify
    signature give them: binary, P(class 1) and label = P >= 0.5; K classes, the most probable class
    and its probability."""
    probability = np.asarray(probability, np.float32).reshape(-1)
    if probability.size == 1:
        label = int(probability[0] >= 0.5)
        return float(probability[0]), label, class_names[label]
    label = int(np.argmax(probability))
    return float(probability[label]), label, class_names[label]


def run(args):
    check_output_path(args.out, "--out")
    model, preprocessing = load_trained_model(args.model)
    model = at_precision(model, args.precision)
    arch = arch_of(model)
    if args.filters and arch != "patchnet":
        raise PatchNetError(f"{args.model}: --filters needs a PatchNet (the subnet's filters); this is {arch}")
    paths = list_images(args.images)
    for path in paths:  # a bad file stops the command before any PNG is written, not halfway
        read_image(path, preprocessing.channels)
    os.makedirs(args.out, exist_ok=True)
    # Progress in rows of the maps, not images: one large image takes minutes at stride 1.
    rows = preprocessing.image_size[0] * len(paths) * (2 if args.filters else 1)
    progress = Progress(rows, "row", "heatmaps")
    results = []
    for path, stem in zip(paths, output_stems(paths)):
        image = prepare_image(path, preprocessing)
        model_input = preprocessing.normalize(image[None]).numpy()
        heats = explain(model, model_input, stride=args.stride, on_rows=progress.add)
        probability = probability_from_map(model, heats, stride=args.stride, images=model_input)[0]
        results.append((path, *classification(probability, preprocessing.class_names)))
        heat = heats[0]
        prefix = os.path.join(args.out, stem)
        write_heatmap_pngs(prefix, heat, preprocessing.class_names, image)
        if args.filters:
            maps = filter_heatmaps(model, model_input, stride=args.stride, on_rows=progress.add)[0]
            write_png(f"{prefix}-filters.png", filter_grid(maps))
    for path, probability, label, name in results:  # after the progress lines, one line per image
        print(f"{path}: probability {probability:.6f}, label {label} ({name})")
    print(f"wrote heatmaps of {len(paths)} image(s) to {args.out}")
