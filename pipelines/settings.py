"""A training run's settings, declared once: typed, with their defaults, flag help and the named presets.

Each field's metadata is its command-line flag (help, type, choices), and
`add_flags` generates the flags of `train`, `sweep`, `compare` and `demo`
from these dataclasses, so a default or a help text lives in one place. A
run's config dict (train_config.json) is its model, data and training
settings flattened (`train_config`). No TensorFlow here: every command's
--help is built from this module before TensorFlow is imported.

Presets:
  PAPER  `patchnet train`'s defaults, the paper's subnet: patch 21, same padding,
         7 conv layers of 64 filters, disjoint patches, Adam 1e-4, batch 4.
  CPU    the CPU-sized PatchNet that `patchnet compare`, `patchnet demo` and the
         tests train, and what we recommend for `patchnet train` on a CPU:

    patchnet train DATA --out RUN --image-size 64x64 --patch-size 15 --stride 3 --padding valid \\
        --filters 16 --conv-layers 3 --learning-rate 3e-3 --batch-size 8 --epochs 150

Why these values: overlapping training patches (`stride=3`), which a valid
subnet computes fully convolutionally at about the cost of disjoint ones,
changed the mask AUROC more than any other setting we measured, most on
sparse evidence (docs/results/comparison.md has the ablation and its cost: a
too bright outer ring of one or two pixels; stride 1 makes it worse). K-class
data needs no preset of its own: compare's defaults, which are CPU, are what
docs/k-classes.md runs, and the hand-picked K-class flags of before stride 3
are no longer needed.
"""

import argparse
import dataclasses

from patchnet_launcher import (
    cell_pixels,
    image_size,
    nonnegative_float,
    nonnegative_int,
    open_unit_interval,
    positive_float,
    positive_int,
    unit_interval,
    zoom_factor,
)

# An ISIC 2017 task's class names, class 0 first (pipelines/data.py reads the CSV with them).
ISIC_TASKS = {
    "melanoma": ("benign", "melanoma"),  # the paper's binary task
    "diagnosis": ("nevus", "melanoma", "seborrheic_keratosis"),  # nevus: neither of the two columns
}
ARCHS = ("patchnet", "cam", "vgg11")


def setting(default, help, *, type=None, choices=None, metavar=None, flag=None, section=None):
    """A dataclass field that is also a flag. Booleans need no type: a False default gives `--name`
    (store_true), a True default `--no-name` (store_false). `section`: the help group it is listed in."""
    metadata = {"help": help, "type": type, "choices": choices, "metavar": metavar, "flag": flag, "section": section}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    arch: str = setting("patchnet", "patchnet: the paper's model; cam and vgg11 (Grad-CAM): the baselines",
                        choices=ARCHS)
    width: int | None = setting(None, "cam / vgg11: filters of the first block (paper: 64; default: 16, CPU-sized)",
                                type=positive_int)
    patch_size: int = setting(21, "patch side in pixels, odd (paper: 21)", type=positive_int)
    stride: int | None = setting(None, "default: patch size", type=positive_int)
    padding: str = setting("same", "same: the paper's subnet; valid: exact one-pass heatmaps (docs/padding.md)",
                           choices=("same", "valid"))
    filters: int = setting(64, "filters per conv layer of the subnet (paper: 64)", type=positive_int)
    conv_layers: int = setting(7, "conv layers of the subnet (paper: 7)", type=positive_int)
    region: tuple | None = setting(None, "only patches from the central HEIGHTxWIDTH vote (paper Appendix F)",
                                   type=image_size)


@dataclasses.dataclass(frozen=True)
class DataSettings:
    images: str | None = setting(None, "ISIC CSV only: folder holding <image_id>.jpg (default: the CSV's folder)",
                                 metavar="DIR")
    isic_task: str = setting("melanoma", "ISIC CSV only: melanoma (the paper's binary task) or diagnosis (three "
                             "classes: nevus, melanoma, seborrheic_keratosis)", choices=sorted(ISIC_TASKS))
    image_size: tuple = setting((128, 128), "HEIGHTxWIDTH", type=image_size)
    gamma: float | None = setting(None, "gamma correction, e.g. 2.2", type=positive_float)
    shades_of_gray: float | None = setting(None, "Shades of Gray colour constancy with this Minkowski norm, e.g. 6",
                                           type=positive_float, metavar="NORM")
    positive_class: str | None = setting(None, "class folder that is class 1")
    val_fraction: float = setting(0.2, "share of each class held out for validation when DATA has no val/ folder",
                                  type=open_unit_interval)
    normalize: bool = setting(True, "feed [0, 1] pixels instead of standardizing each channel with the training "
                              "split's mean and standard deviation (saved in preprocessing.json)")
    balance: bool = setting(True, "draw training images as they come instead of equally per class",
                            section="input pipeline")
    # None: the command has no --skip-bad, so an error about a bad file does not suggest it (compare).
    skip_bad: bool | None = setting(False, "skip (and list) undecodable images instead of stopping at the first",
                                    section="input pipeline")
    cache: str = setting("auto", "keep decoded images in memory (auto: when they fit)", choices=("auto", "memory", "off"),
                         section="input pipeline")


AUGMENTATION = "augmentation (training step only; never in the saved model)"


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    batch_size: int = setting(4, "images per step (paper: 4)", type=positive_int)
    epochs: int = setting(100, "most epochs; stopping may end sooner", type=positive_int)
    learning_rate: float = setting(1e-4, "Adam learning rate (paper: 1e-4)", type=positive_float)
    patience: int = setting(20, "epochs without a better val_loss before stopping, counted once the training loss "
                            "has left the ln 2 plateau (paper: 1000)", type=positive_int)
    stop_at_perfect_accuracy: bool = setting(False, "the paper's second rule: stop when training accuracy reaches 100 %%")
    seed: int = setting(0, "seeds the split, the shuffle, augmentation and the initial weights", type=nonnegative_int)
    rotation: float = setting(0.0, "random rotation up to this angle either way (paper, dermoscopy: 180)",
                              type=nonnegative_float, metavar="DEGREES", section=AUGMENTATION)
    zoom: float = setting(1.0, "random zoom-in up to this factor (paper, dermoscopy: 1.2)", type=zoom_factor,
                          metavar="FACTOR", section=AUGMENTATION)
    horizontal_flip: bool = setting(False, "random left-right flips", section=AUGMENTATION)
    vertical_flip: bool = setting(False, "random up-down flips", section=AUGMENTATION)
    border_patches: bool = setting(True, "PatchNet: do not pad each batch by a random border of up to half a patch "
                                   "(which teaches the subnet the zero padding its heatmaps see at the image border)",
                                   section=AUGMENTATION)
    mixed_precision: str = setting("auto", "auto: float16 on a GPU; bfloat16 for a PatchNet subnet of 32+ filters on a CPU "
                                   "with AMX or AVX512-BF16; float32 elsewhere. Outputs and loss stay float32",
                                   choices=("auto", "off", "float16", "bfloat16"), section="scale")
    strategy: str = setting("default", "mirrored: all local GPUs; multiworker: several machines (reads TF_CONFIG). "
                            "--batch-size is the global batch", choices=("default", "mirrored", "multiworker"),
                            section="scale")
    heatmap_every: int = setting(5, "log validation heatmaps every N epochs (0: never)", type=nonnegative_int,
                                 metavar="EPOCHS", section="TensorBoard")
    heatmap_images: int = setting(4, "how many fixed validation images (half per class) to log", type=nonnegative_int,
                                  metavar="COUNT", section="TensorBoard")


@dataclasses.dataclass(frozen=True)
class ComparisonSettings:
    """`patchnet compare`'s own settings; its three runs take Model/Data/TrainingSettings (`compare.run_configs`)."""

    masks: str | None = setting(None, "mask folder (default: DATA/masks)", metavar="DIR")
    mask_split: str = setting("val", "split whose masks Table 2 and the figure use (paper: validation)",
                              choices=("val", "test"))
    no_train: bool = setting(False, "only load the three runs in --out")
    baseline_batch_size: int = setting(16, "CAM and VGG-11 batch (paper: 64)", type=positive_int,
                                       section="CAM and VGG-11")
    baseline_learning_rate: float = setting(3e-4, "CAM and VGG-11 Adam learning rate (docs/comparison.md: how it "
                                            "was picked)", type=positive_float, section="CAM and VGG-11")
    threshold: float = setting(0.5, "heatmap threshold for Table 2", type=unit_interval, section="maps and figure")
    heatmap_stride: int = setting(1, "PatchNet heatmap stride (costly for padding='same' models)", type=positive_int,
                                  section="maps and figure")
    samples: int = setting(6, "images in the figure", type=positive_int, section="maps and figure")
    cell: int = setting(128, "figure cell size in pixels", type=cell_pixels, section="maps and figure")
    eval_batch_size: int = setting(16, "images per batch when evaluating", type=positive_int,
                                   flag="--batch-size-eval", section="maps and figure")


def add_flags(parser, settings, *, only=None, defaults=None, helps=None):
    """Adds a flag per field of the dataclass `settings` (those named in `only`, if given) to `parser`.

    `defaults` and `helps` (field name -> value) replace a field's default or help where a command's
    flag means the same setting with another default (a preset) or for a narrower purpose. Fields with
    a `section` go in an argument group of that title when `parser` is a whole parser; given an
    argument group, the caller has grouped them already.
    """
    sections = {}
    for field in dataclasses.fields(settings):
        if only is not None and field.name not in only:
            continue
        meta = field.metadata
        default = (defaults or {}).get(field.name, field.default)
        kwargs = {"dest": field.name, "help": (helps or {}).get(field.name, meta["help"])}
        flag = meta["flag"] or "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
            if default:
                flag = "--no-" + flag[2:]
        else:
            kwargs["default"] = default
            kwargs.update({key: meta[key] for key in ("type", "choices", "metavar") if meta[key] is not None})
        group = parser
        if meta["section"] and isinstance(parser, argparse.ArgumentParser):
            if meta["section"] not in sections:
                sections[meta["section"]] = parser.add_argument_group(meta["section"])
            group = sections[meta["section"]]
        group.add_argument(flag, **kwargs)


def settings_from(settings, values, **changes):
    """A `settings` dataclass of the fields `values` (parsed flags as a dict, a preset) has, the others at
    their defaults; then `changes`."""
    names = {field.name for field in dataclasses.fields(settings)}
    return dataclasses.replace(settings(**{key: value for key, value in values.items() if key in names}), **changes)


def train_config(model, data, training, /, **paths):
    """A run's config dict, train_config.json's keys: the model, data and training settings, plus `paths`
    (data, out)."""
    return {**dataclasses.asdict(model), **dataclasses.asdict(data), **dataclasses.asdict(training), **paths}


PAPER = train_config(ModelSettings(), DataSettings(), TrainingSettings())
CPU = train_config(
    ModelSettings(patch_size=15, stride=3, padding="valid", filters=16, conv_layers=3),
    DataSettings(image_size=(64, 64)),
    TrainingSettings(learning_rate=3e-3, batch_size=8, epochs=150, patience=20),
)


def cpu_stride(padding):
    """CPU's training stride for a subnet padding: overlapping patches for a valid subnet (computed
    fully convolutionally), disjoint ones (None) for a same-padded subnet, whose patches cost one
    subnet call each."""
    return CPU["stride"] if padding == "valid" else None
