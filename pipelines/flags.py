"""The flags of the pipelines' commands, declared without TensorFlow.

`patchnet_launcher` builds a command's parser from `add_<command>_arguments`
here and parses the command line before the command's module (which imports
TensorFlow) is imported: --help and a bad flag answer at once. The training
settings' flags are generated from `pipelines.settings`.
"""

import argparse
import contextlib
import io
import logging
import os

from patchnet_launcher import (
    nonnegative_int,
    open_unit_interval,
    port_number,
    positive_float,
    positive_int,
    unit_interval,
)
from pipelines.settings import (
    ARCHS,
    CPU,
    ComparisonSettings,
    DataSettings,
    ModelSettings,
    TrainingSettings,
    add_flags,
)

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
DEFAULT_MAX_REQUEST_PIXELS = 256_000_000
# The heatmap signature's patches per subnet call: patchnet_tf.heatmaps.DEFAULT_CHUNK_PATCHES, which cannot be
# imported without TensorFlow (tests/test_cli.py checks that the two agree).
DEFAULT_CHUNK_PATCHES = 1024
# patchnet_tf.precision.PRECISIONS, likewise (tests/test_precision.py checks that the two agree).
MAP_PRECISIONS = ("auto", "float32", "bfloat16")
CHANCE_AUROC = 0.5


def add_train_arguments(parser):
    parser.add_argument("data", help="dataset folder: DATA/<class>/*.png, two or more classes (or DATA/train, "
                        "DATA/val), or an ISIC 2017 ground-truth CSV (image_id,melanoma,...)")
    parser.add_argument("--out", required=True, help="run folder; an existing run there resumes")
    add_run_settings(parser)


def add_run_settings(parser):
    """Every setting of a `patchnet train` run as a flag (train and sweep)."""
    for settings in (ModelSettings, DataSettings, TrainingSettings):
        add_flags(parser, settings)


def add_sweep_arguments(parser):
    parser.add_argument("data", help="dataset folder or ISIC CSV, as for `patchnet train`")
    parser.add_argument("--out", required=True, help="sweep folder: one run folder per setting inside")
    parser.add_argument("--patch-sizes", type=list_of(positive_int), default=None,
                        help="comma-separated patch sizes, e.g. 11,17,31 (PatchNet runs)")
    parser.add_argument("--archs", type=list_of(str), default=["patchnet"],
                        help=f"comma-separated architectures: {', '.join(ARCHS)}")
    parser.add_argument("--learning-rates", type=list_of(positive_float), default=None,
                        help="comma-separated learning rates (default: --learning-rate)")
    add_run_settings(parser)


def list_of(kind):
    """A comma-separated list of `kind` values; `kind` is a flag type, which refuses a bad value itself."""
    def parse(text):
        values = [kind(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list such as 11,17,31, got {text!r}")
        return values

    return parse


# compare's flags for its runs' settings, defaulting to the CPU preset: the shared ones apply to all three runs
# except --batch-size and --learning-rate, PatchNet's (the baselines have their own, ComparisonSettings').
COMPARE_SHARED = ("image_size", "epochs", "patience", "learning_rate", "batch_size", "horizontal_flip",
                  "vertical_flip", "seed", "normalize", "stop_at_perfect_accuracy")
COMPARE_PATCHNET = ("patch_size", "stride", "padding", "filters", "conv_layers", "border_patches")


def add_compare_arguments(parser):
    parser.add_argument("data", help="folder dataset with DATA/train, DATA/val (DATA/test) and masks")
    parser.add_argument("--out", required=True, help="folder for the three runs, the tables and the figure")
    defaults = {**CPU, "stride": None}  # None: CPU's stride rule for the padding (settings.cpu_stride)
    helps = {
        "epochs": "most epochs per model",
        "learning_rate": "PatchNet's Adam learning rate (paper: 1e-4 over hundreds of epochs)",
        "batch_size": "PatchNet's batch (paper: 4)",
        "stride": "training patch stride (default: 3 for valid padding, overlapping patches computed fully "
                  "convolutionally; the patch size for same padding, as the paper)",
    }
    group = parser.add_argument_group("training (the `patchnet train` flags of all three runs)")
    for settings in (DataSettings, TrainingSettings):
        add_flags(group, settings, only=COMPARE_SHARED, defaults=defaults, helps=helps)
    group = parser.add_argument_group("PatchNet")
    for settings in (ModelSettings, TrainingSettings):
        add_flags(group, settings, only=COMPARE_PATCHNET, defaults=defaults, helps=helps)
    add_flags(parser, ComparisonSettings)


def add_demo_arguments(parser):
    parser.add_argument("--out", default="demo-output", help="folder for everything the demo writes")
    add_flags(parser, DataSettings, only=("image_size",), defaults=CPU)
    add_flags(parser, TrainingSettings, only=("epochs", "seed"), defaults=CPU,
              helps={"epochs": "most training epochs", "seed": "seeds the data and the training"})
    add_flags(parser, ModelSettings, only=("patch_size", "padding"), defaults=CPU)
    parser.add_argument("--port", type=port_number, default=0, help="local server port (0: a free one)")


def add_heatmap_arguments(parser):
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--model", required=True, help="a run folder of `patchnet train` or its model.keras")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--stride", type=positive_int, default=1,
                        help="evaluate every s-th pixel and fill s x s blocks (cost ~1/s^2)")
    parser.add_argument("--filters", action="store_true", help="also write the filter heatmaps")
    add_precision_argument(parser)


def add_precision_argument(parser):
    parser.add_argument("--precision", choices=MAP_PRECISIONS, default="auto",
                        help="compute the model in this precision (PatchNet's tail after its convs and the "
                             "probabilities stay float32); "
                             "auto: bfloat16 for a subnet of 32+ filters on a CPU with AMX or AVX512-BF16, "
                             "float32 elsewhere")


def add_evaluate_arguments(parser):
    parser.add_argument("model", help="run folder of `patchnet train` (or its model.keras)")
    parser.add_argument("data", help="dataset folder: DATA/<class>/*.png (or DATA/train, DATA/val, DATA/test)")
    parser.add_argument("--split", choices=("val", "test", "train"), default="val", help="which split of DATA")
    parser.add_argument("--masks", default=None, metavar="DIR",
                        help="folder of binary mask PNGs named like the images (K classes: DIR/<class>/): "
                        "adds exact match, recall, AUROC")
    parser.add_argument("--threshold", type=unit_interval, default=0.5, help="heatmap threshold for the mask metrics")
    parser.add_argument("--heatmap-stride", type=positive_int, default=1,
                        help="PatchNet heatmap stride; s costs about 1/s^2 of stride 1 for padding='same' models")
    parser.add_argument("--skip-unmasked", action="store_true",
                        help="leave images without a mask file out of the mask metrics instead of failing")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per batch")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    add_precision_argument(parser)


def add_pixel_limit_arguments(parser):
    """--max-image-pixels and --max-request-pixels, shared by export and push."""
    parser.add_argument("--max-image-pixels", type=positive_int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="refuse (INVALID_ARGUMENT, before decoding) an image whose header declares more "
                             f"pixels than this (default {DEFAULT_MAX_IMAGE_PIXELS:,}: 64 megapixels)")
    parser.add_argument("--max-request-pixels", type=positive_int, default=DEFAULT_MAX_REQUEST_PIXELS,
                        help="refuse a request whose images together declare more pixels than this "
                             f"(default {DEFAULT_MAX_REQUEST_PIXELS:,})")


def add_export_arguments(parser):
    parser.add_argument("model", help="run folder (model.keras + preprocessing.json) or a .keras file")
    parser.add_argument("--out", required=True, help="new folder for the SavedModel")
    parser.add_argument("--heatmap-stride", type=positive_int, default=1,
                        help="stride of the heatmap signatures (1 = every pixel, the paper's map)")
    parser.add_argument("--chunk-patches", type=positive_int, default=DEFAULT_CHUNK_PATCHES,
                        help="patches per subnet call inside the heatmap signature (bounds memory)")
    add_pixel_limit_arguments(parser)


def add_push_arguments(parser):
    parser.add_argument("model", help="run folder (model.keras + preprocessing.json) or a .keras file")
    parser.add_argument("--base", required=True, help="model base folder that TF Serving watches")
    parser.add_argument("--data", required=True, help="dataset folder; its validation split is used")
    parser.add_argument("--model-name", default=None, help="default: the base folder's name")
    parser.add_argument("--version", type=positive_int, default=None, help="default: highest + 1")
    parser.add_argument("--min-accuracy", type=unit_interval, default=0.0,
                        help="validation accuracy the model must reach to be blessed")
    parser.add_argument("--min-auroc", type=unit_interval, default=CHANCE_AUROC,
                        help="the AUROC must be above this; 0.5 refuses a model no better than chance, "
                        "0 allows any")
    parser.add_argument("--tolerance", type=unit_interval, default=0.01,
                        help="how much worse than the served version a candidate may be")
    parser.add_argument("--heatmap-stride", type=positive_int, default=1, help="stride of the exported heatmap signatures")
    parser.add_argument("--val-fraction", type=open_unit_interval, default=None,
                        help="default: the run's train_config.json, else 0.2")
    parser.add_argument("--seed", type=nonnegative_int, default=None,
                        help="split seed (default: the run's train_config.json, else 0)")
    parser.add_argument("--positive-class", default=None,
                        help="class folder that is class 1 (default: the run's, else the second in sorted order)")
    parser.add_argument("--config-base-path", default=None,
                        help="base_path written to models.config (default /models/<base folder name>)")
    add_pixel_limit_arguments(parser)


def add_bulk_arguments(parser):
    parser.epilog = ("Any Beam pipeline option passes through as --name=value, e.g. --runner FlinkRunner "
                     "--flink_master=host:8081 (docs/bulk.md).")
    parser.add_argument("inputs", nargs="+",
                        help="image files, folders of images, glob patterns ('data/**/*.jpg'), "
                             "or CSV files with a 'path' column (relative to the CSV's folder)")
    parser.add_argument("--model", required=True, help="a run folder of `patchnet train` or its model.keras")
    parser.add_argument("--out", required=True, help="folder for the PNGs, results.csv and dead-letter.csv")
    parser.add_argument("--stride", type=positive_int, default=1,
                        help="evaluate every s-th pixel and fill s x s blocks (cost ~1/s^2)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="most images per model call (Beam's BatchElements sizes batches up to it)")
    parser.add_argument("--runner", default="DirectRunner",
                        help="a Beam runner; any other Beam pipeline option passes through as --name=value")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="DirectRunner worker processes (Beam's direct_num_workers)")
    parser.add_argument("--tf-threads", type=positive_int, default=None,
                        help="TensorFlow intra- and inter-op threads per worker (default: DirectRunner: the "
                             "cores divided among the workers; other runners: TensorFlow's default)")
    add_precision_argument(parser)


def parse_bulk_arguments(parser, argv):
    """Our flags, plus Beam's own pipeline options (`--name=value`) in args.beam_options."""
    args, rest = parser.parse_known_args(argv)  # --help and our flags' errors: before Beam is imported
    # Importing Beam logs "apitools not found ..." to the root logger (its BigQuery client, never used
    # here): the import runs with the root logger quiet, as in pipelines/bulk.py.
    quiet = logging.NullHandler()
    logging.getLogger().addHandler(quiet)
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    finally:
        logging.getLogger().removeHandler(quiet)
    options = PipelineOptions(rest)
    beam_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = beam_log.level
    beam_log.setLevel(logging.ERROR)  # its "Discarding unparseable args" says what our error below says
    try:  # Beam parses its options with an argparse parser of its own, whose error is its whole usage
        with contextlib.redirect_stderr(io.StringIO()) as beam_error:
            known = options.get_all_options(drop_default=True)
    except SystemExit:  # its last line: "<prog>: error: argument --name: why"
        reason = beam_error.getvalue().strip().splitlines()[-1].split(" error: ", 1)[-1]
        parser.error(f"Beam pipeline option {reason.removeprefix('argument ')}")
    finally:
        beam_log.setLevel(level)
    unknown = [flag for flag in rest if not flag.startswith("--") or
               flag[2:].split("=", 1)[0] not in known]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (Beam pipeline options are --name=value)")
    args.beam_options = rest
    return args
