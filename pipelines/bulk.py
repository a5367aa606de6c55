"""`patchnet bulk`: heatmaps for a whole archive on Apache Beam, with `RunInference`.

For every input image, the same files `patchnet heatmap` writes
(`<stem>-heatmap.png`, `<stem>-overlay.png`, same pixels), plus one row
(path, probability, label, class name) in `results.csv`. Images that cannot
be read go to `dead-letter.csv` with the reason; the run goes on. The
probability is read from the map (`probability_from_map`: the mean of the
map at the centres of the patches the classifier averages), so an image
costs one map and no second model call wherever the map holds those patches.

The pipeline, one path for every runner:

    Create(to do) | Decode (bad images -> dead letter)
                  | RunInference(PatchNetModelHandler)   Beam's batching, one model per worker
                  | WriteOutputs                         PNGs, then rows/<stem>.csv, each atomic
    rows of this run + rows of earlier runs | one sorted results.csv, atomic

Idempotent: an image whose two PNGs and row file exist is done; a re-run
leaves it out before the pipeline starts (counted as skipped), and when every
image is done no pipeline starts and no model is loaded. A run killed
half-way leaves whole files only, so the same command finishes the job.

Runners: `--runner DirectRunner` (default) runs in one process per core here
(`direct_running_mode=multi_processing`), each with its share of the cores
for TensorFlow's thread pools (`--tf-threads`); any other Beam option given as
`--name=value` goes to Beam as is (`--runner=FlinkRunner
--flink_master=...`, Spark, Dataflow; docs/bulk.md). The inputs and `--out`
must be paths every worker sees (a shared file system).
"""

import csv
import dataclasses
import glob
import io
import json
import logging
import os
import threading
import time
import zipfile

import numpy as np

# Importing Beam logs "apitools not found ..." to the root logger (its BigQuery client, which bulk
# never uses), a line users read as part of their command's answer: the import runs with the root
# logger quiet. (A handler on root also keeps logging from installing its own stderr one.)
_quiet = logging.NullHandler()
logging.getLogger().addHandler(_quiet)
try:
    import apache_beam as beam
    from apache_beam.metrics import Metrics, MetricsFilter
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
    from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
    from apache_beam.runners.runner import create_runner
finally:
    logging.getLogger().removeHandler(_quiet)

from patchnet_tf.atomic import atomic_write_text, check_output_path, remove_stale_temporaries
from patchnet_tf.errors import PatchNetError
from patchnet_tf.heatmaps import output_stems, png_suffixes, probability_from_map, write_heatmap_pngs
from patchnet_tf.precision import at_precision
from patchnet_tf.preprocessing import Preprocessing
from patchnet_tf.runs import MODEL_FILE, load_trained_model

NAMESPACE = "patchnet.bulk"
RESULTS_FILE = "results.csv"
DEAD_LETTER_FILE = "dead-letter.csv"
ROWS_FOLDER = "rows"  # one row file per finished image: the mark that it is done
RESULT_COLUMNS = ("path", "probability", "label", "class_name")
DEAD_LETTER_COLUMNS = ("path", "reason")
PROGRESS_SECONDS = 5.0
DONE = Metrics.counter(NAMESPACE, "images_done")
SKIPPED = Metrics.counter(NAMESPACE, "images_skipped")
FAILED = Metrics.counter(NAMESPACE, "images_failed")


def list_inputs(inputs):
    """Image paths, in order, without repeats, from files, folders, glob patterns and CSVs of paths."""
    from pipelines.heatmaps import list_images

    paths = []
    for item in inputs:
        if os.path.isfile(item) and item.lower().endswith(".csv"):
            paths += _csv_paths(item)
        elif not os.path.exists(item) and any(character in item for character in "*?["):
            found = sorted(path for path in glob.glob(item, recursive=True) if os.path.isfile(path))
            if not found:
                raise PatchNetError(f"{item}: no files match this pattern")
            paths += found
        else:
            paths += list_images([item])
    unique = {}
    for path in paths:  # one image named two ways (a folder and a CSV) is one image
        unique.setdefault(os.path.abspath(path), path)
    return list(unique.values())


def _csv_paths(csv_path):
    try:
        with open(csv_path, newline="") as file:
            rows = list(csv.DictReader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PatchNetError(f"{csv_path}: unreadable CSV ({error})") from None
    if not rows or "path" not in rows[0]:
        raise PatchNetError(f"{csv_path}: expected a CSV with a 'path' column and at least one row")
    folder = os.path.dirname(os.path.abspath(csv_path))
    return [os.path.normpath(os.path.join(folder, row["path"])) for row in rows if row["path"]]


# --- per-image outputs ---------------------------------------------------------------------

def output_paths(out, stem, class_names):
    """The files that make one image done (the PNGs `patchnet heatmap` writes, then the row file, last)."""
    pngs = [os.path.join(out, stem + suffix) for suffix in png_suffixes(class_names)]
    return pngs + [os.path.join(out, ROWS_FOLDER, stem + ".csv")]


def is_done(out, stem, class_names):
    return all(os.path.isfile(path) for path in output_paths(out, stem, class_names))


def _csv_line(values):
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def read_row(out, stem):
    with open(os.path.join(out, ROWS_FOLDER, stem + ".csv"), newline="") as file:
        return next(csv.reader(file))


def write_table(path, columns, rows):
    """A whole CSV (header, then rows sorted by path), written atomically."""
    atomic_write_text(path, "".join(_csv_line(values) for values in [columns, *sorted(rows)]))


# --- the Beam pieces ---------------------------------------------------------------------

def set_tf_threads(threads):
    """Sizes this process's TensorFlow thread pools (intra- and inter-op) to `threads`; None leaves
    TensorFlow's default (one thread per core of the machine in each pool).

    Must run before the process's first TensorFlow op: Decode's and the model handler's setup both call
    it, whichever Beam runs first (setting the same value again is a no-op)."""
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


class Decode(beam.DoFn):
    """(path, stem) -> (path, stem, prepared image); an unreadable image -> the dead-letter output."""

    DEAD_LETTER = "dead_letter"

    def __init__(self, preprocessing, threads=None):
        self.preprocessing = preprocessing
        self.threads = threads

    def setup(self):
        set_tf_threads(self.threads)  # decoding runs TensorFlow ops (resize), maybe before the model loads

    def process(self, element):
        from pipelines.heatmaps import prepare_image

        path, stem = element
        try:
            yield path, stem, prepare_image(path, self.preprocessing)
        except PatchNetError as error:
            FAILED.inc()
            yield beam.pvalue.TaggedOutput(self.DEAD_LETTER, (path, str(error)))


@dataclasses.dataclass(eq=False)
class LoadedModel:
    """What a worker loads once and shares between its threads (Beam keeps a weak reference to it)."""

    model: object
    preprocessing: Preprocessing


class PatchNetModelHandler(ModelHandler):
    """Beam's extension point for a model: load a `patchnet train` run; a batch -> probability and heatmap.

    Beam's own TensorFlow handlers call `model(batch)` for one output (and
    import tensorflow_hub); a PatchNet gives a probability and a dense map per
    image, the map computed by the same `explain` call `patchnet heatmap`
    makes and the probability read from it (`probability_from_map`; the
    model is called only where the map does not hold the classifier's
    patches, and for CAM / VGG-11 models).
    Examples are (path, stem, prepared image); inferences (probability, heatmap).
    """

    def __init__(self, model_path, *, stride=1, max_batch_size=8, threads=None, precision="float32"):
        super().__init__(min_batch_size=1, max_batch_size=max_batch_size)
        self.model_path = model_path
        self.stride = stride
        self.threads = threads
        self.precision = precision

    def load_model(self):
        set_tf_threads(self.threads)  # worker processes sharing one machine: each takes its share of the cores
        model, preprocessing = load_trained_model(self.model_path)
        return LoadedModel(at_precision(model, self.precision), preprocessing)

    def run_inference(self, batch, loaded, inference_args=None):
        from patchnet_tf.explain import explain

        model, preprocessing = loaded.model, loaded.preprocessing
        inputs = preprocessing.normalize(np.stack([image for _, _, image in batch])).numpy()
        heats = explain(model, inputs, stride=self.stride)
        # (B, 1) probability of class 1, or (B, K) for a K-class model
        outputs = probability_from_map(model, heats, stride=self.stride, images=inputs)
        probabilities = outputs[:, 0] if outputs.shape[-1] == 1 else outputs
        return [PredictionResult(example, (probability, heat))
                for example, probability, heat in zip(batch, probabilities, heats)]

    def get_num_bytes(self, batch):
        return sum(image.nbytes for _, _, image in batch)

    def get_metrics_namespace(self):
        return NAMESPACE


class WriteOutputs(beam.DoFn):
    """A prediction -> its PNGs and its row file (each written atomically, the row last) -> the row."""

    def __init__(self, out, class_names):
        self.out = out
        self.class_names = class_names

    def process(self, result):
        (path, stem, image), (probability, heat) = result.example, result.inference
        from pipelines.heatmaps import classification

        write_heatmap_pngs(os.path.join(self.out, stem), heat, self.class_names, image)  # output_paths' PNGs
        row_file = output_paths(self.out, stem, self.class_names)[-1]
        probability, label, name = classification(probability, self.class_names)
        row = [path, f"{probability:.9g}", str(label), name]
        atomic_write_text(row_file, _csv_line(row))
        DONE.inc()
        yield row


def _failed_batch(failure):
    """RunInference's dead letter holds (batch, exception info): one row per image of the batch."""
    batch, (_, error_repr, _) = failure
    for path, _, _ in batch:
        FAILED.inc()
        yield path, f"inference failed: {error_repr}"


def _count_skipped(row):
    SKIPPED.inc()
    return row


def build_pipeline(pipeline, todo, done_rows, *, model_path, preprocessing, out, stride, batch_size,
                   threads=None, precision="float32"):
    """The bulk pipeline on `pipeline`; writes everything under `out`. `threads`: TF threads per worker;
    `precision`: the maps' (`patchnet_tf.precision.at_precision`, resolved on each worker's CPU)."""
    decoded = (
        pipeline
        | "Images to do" >> beam.Create(todo)
        | "Decode" >> beam.ParDo(Decode(preprocessing, threads)).with_outputs(Decode.DEAD_LETTER, main="images")
    )
    predictions, inference_failures = (
        decoded.images
        | "RunInference" >> RunInference(
            PatchNetModelHandler(model_path, stride=stride, max_batch_size=batch_size, threads=threads,
                                 precision=precision)
        ).with_exception_handling()
    )
    new_rows = predictions | "Write PNGs and rows" >> beam.ParDo(WriteOutputs(out, preprocessing.class_names))
    earlier_rows = (pipeline | "Rows already done" >> beam.Create(done_rows)
                    | "Count skipped" >> beam.Map(_count_skipped))
    (
        (new_rows, earlier_rows)
        | "All rows" >> beam.Flatten()
        | "Collect rows" >> beam.combiners.ToList()
        | "Write results.csv" >> beam.Map(
            lambda rows: write_table(os.path.join(out, RESULTS_FILE), RESULT_COLUMNS, [tuple(r) for r in rows]))
    )
    failed_inference = (inference_failures.failed_inferences
                        | "Failed batches" >> beam.FlatMap(_failed_batch))
    (
        (decoded[Decode.DEAD_LETTER], failed_inference)
        | "All failures" >> beam.Flatten()
        | "Collect failures" >> beam.combiners.ToList()
        | "Write dead-letter.csv" >> beam.Map(
            lambda rows: write_table(os.path.join(out, DEAD_LETTER_FILE), DEAD_LETTER_COLUMNS, rows))
    )


def pipeline_options(args):
    """Beam's options: the user's, over our defaults (multi-process DirectRunner, quiet workers)."""
    defaults = {"default_sdk_harness_log_level": "WARNING"}
    if args.runner in ("DirectRunner", "direct"):
        defaults.update(direct_running_mode="multi_processing", direct_num_workers=args.workers)
    given = {flag[2:].split("=", 1)[0] for flag in args.beam_options}
    flags = [f"--runner={args.runner}", *args.beam_options]
    flags += [f"--{name}={value}" for name, value in defaults.items() if name not in given]
    return PipelineOptions(flags)


def threads_per_worker(options, tf_threads=None):
    """TF threads (intra- and inter-op) per worker: `--tf-threads` if given; for DirectRunner workers,
    which share this machine's cores, each its share rather than all of them (n workers of n threads
    each would run n^2 threads on n cores); other runners: None, TF's default on each worker machine."""
    if tf_threads:
        return tf_threads
    if options.view_as(StandardOptions).runner not in ("DirectRunner", "direct"):
        return None
    return max(1, (os.cpu_count() or 1) // options.view_as(DirectOptions).direct_num_workers)


WEIGHTS_ENTRY = "model.weights.h5"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_model_file(path):
    """The driver's check that the workers can load the model, without loading it (no TensorFlow,
    no model built): a .keras archive whose entries pass their CRC checks, with a model config and
    an HDF5 weights file. Other formats are loaded (`load_trained_model`). A model that passes and
    still fails to load stops the workers, with the loader's error at the end of Beam's traceback."""
    if not path.endswith(".keras"):
        load_trained_model(path)
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every entry (the weights: a few MB) and checks its CRC
            config = json.loads(archive.read("config.json"))
            with archive.open(WEIGHTS_ENTRY) as weights:
                signature = weights.read(len(HDF5_SIGNATURE))
    except zipfile.BadZipFile:  # the words of load_trained_model
        raise PatchNetError(f"{path}: not a .keras archive (truncated or not a zip file); train or copy it again"
                            ) from None
    except (KeyError, ValueError, OSError, EOFError) as error:
        raise PatchNetError(f"{path}: not a loadable Keras model ({type(error).__name__}: {error})") from None
    if damaged is not None:
        raise PatchNetError(f"{path}: not a loadable Keras model ({damaged} is damaged); train or copy it again")
    if not isinstance(config, dict) or "class_name" not in config or signature != HDF5_SIGNATURE:
        raise PatchNetError(f"{path}: not a loadable Keras model (no model config, or {WEIGHTS_ENTRY} is not HDF5)")


class RowFileProgress:
    """A line every few seconds from the row files appearing (any runner, on the shared --out)."""

    def __init__(self, out, total, skipped):
        self.rows = os.path.join(out, ROWS_FOLDER)
        self.total, self.skipped = total, skipped
        self.before = self._count()
        self.start = time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _count(self):
        return len(os.listdir(self.rows)) if os.path.isdir(self.rows) else 0

    def _loop(self):
        while not self.stopped.wait(PROGRESS_SECONDS):
            written = self._count() - self.before
            rate = written / (time.monotonic() - self.start)
            print(f"bulk: {self.skipped + written}/{self.total} images done ({self.skipped} skipped), "
                  f"{rate:.1f} images/s", flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()


def counters(result):
    values = {"images_done": 0, "images_skipped": 0, "images_failed": 0}
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        if counter.key.metric.name in values:
            # Committed where the runner supports it, else attempted (some runners report only that).
            value = counter.committed if counter.committed is not None else counter.attempted
            values[counter.key.metric.name] += value or 0
    return values


def check_runner(name):
    """Refuses a --runner Beam does not know before any work (Beam would raise when the pipeline is built)."""
    try:
        create_runner(name)
    except (ValueError, ImportError) as error:  # a short name it lacks; a module path that does not import
        raise PatchNetError(f"--runner {name}: {error}") from None


def run(args):
    check_output_path(args.out, "--out")
    check_runner(args.runner)
    model_file = os.path.join(args.model, MODEL_FILE) if os.path.isdir(args.model) else args.model
    if not os.path.isfile(model_file):
        raise PatchNetError(f"{model_file}: no such model file (a run folder of `patchnet train` or a .keras file)")
    preprocessing = Preprocessing.for_model(model_file)
    paths = list_inputs(args.inputs)
    out = os.path.abspath(args.out)
    for folder in (out, os.path.join(out, ROWS_FOLDER)):
        remove_stale_temporaries(folder)  # what a killed run was writing; its image is still to do
    todo, done_rows = [], []
    for path, stem in zip(paths, output_stems(paths)):
        if is_done(out, stem, preprocessing.class_names):
            done_rows.append(read_row(out, stem))
        else:
            todo.append((path, stem))
    if not todo:  # nothing to compute: no pipeline, no model
        write_table(os.path.join(out, RESULTS_FILE), RESULT_COLUMNS, [tuple(r) for r in done_rows])
        write_table(os.path.join(out, DEAD_LETTER_FILE), DEAD_LETTER_COLUMNS, [])
        print(f"bulk: all {len(paths)} image(s) already have outputs in {args.out}; nothing to do")
        return 0
    check_model_file(model_file)  # a model the workers cannot load is one line here, not a worker traceback
    os.makedirs(os.path.join(out, ROWS_FOLDER), exist_ok=True)  # after every check: a refused run leaves no folder
    print(f"bulk: {len(todo)} image(s) to do, {len(done_rows)} already done; runner {args.runner}", flush=True)
    # The local job service relays every worker's start-up warnings; failures still raise.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    options = pipeline_options(args)
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, todo, done_rows, model_path=os.path.abspath(model_file), preprocessing=preprocessing,
                   out=out, stride=args.stride, batch_size=args.batch_size,
                   threads=threads_per_worker(options, args.tf_threads), precision=args.precision)
    with RowFileProgress(out, len(paths), len(done_rows)):
        result = pipeline.run()
        result.wait_until_finish()
    counts = counters(result)
    print(f"bulk: {counts['images_done']} done, {counts['images_skipped']} skipped, "
          f"{counts['images_failed']} failed; results in {os.path.join(args.out, RESULTS_FILE)}"
          + (f", failures in {os.path.join(args.out, DEAD_LETTER_FILE)}" if counts["images_failed"] else ""))
    return 0
