"""`patchnet push`: evaluate, bless, warm up, infra-validate and push a version (TFX style).

The steps, each of which must pass before the next runs:

  export          the candidate SavedModel, in a staging folder outside BASE
  evaluate        the candidate's classify signature, run through the session
                  loader on the validation split's encoded images (what the
                  server will compute), and the same for the version now
                  served (the highest BASE/<integer> that loads), if any
  bless           meets --min-accuracy / beats --min-auroc (0.5: chance) and is not worse than
                  the served version by more than --tolerance (K classes: accuracy of
                  the most probable class, macro one-vs-rest AUROC)
  warmup          assets.extra/tf_serving_warmup_requests, every signature
  infra-validate  a fresh process loads it as TF Serving does, replays the
                  warmup requests and checks output shapes and ranges
  push            copy into BASE/.tmp-<version>-* (not an integer, so TF
                  Serving ignores it), saved_model.pb last, rename to
                  BASE/<version>; then models.config beside BASE

A failed step raises PushError naming the step and why, and leaves BASE as
it was (the staging folder is deleted).
"""

import dataclasses
import os
import shutil
import tempfile

import numpy as np
from google.protobuf import text_format
from sklearn.metrics import roc_auc_score
from tensorflow_serving.config import model_server_config_pb2

from patchnet_tf.atomic import atomic_write_text, check_output_path, fsync
from patchnet_tf.errors import PatchNetError
from patchnet_tf.runs import read_train_config
from pipelines.data import load_folder_dataset
from pipelines.export import check_pixel_limits, export_saved_model
from pipelines.flags import CHANCE_AUROC, DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_PIXELS
from pipelines.settings import PAPER
from serving import warmup
from serving.core import list_versions
from serving.loader import LoadedModel, first_line

STEPS = ("export", "evaluate", "bless", "warmup", "infra-validate", "push")
EVAL_BATCH = 16


class PushError(PatchNetError):
    def __init__(self, step, reason):
        super().__init__(f"push failed at step {step!r}: {reason}; nothing was pushed")
        self.step = step
        self.reason = reason


@dataclasses.dataclass
class Evaluation:
    accuracy: float
    auroc: float | None  # None when the split holds one class only
    examples: int

    def text(self):
        auroc = "n/a" if self.auroc is None else f"{self.auroc:.4f}"
        return f"accuracy {self.accuracy:.4f}, AUROC {auroc} on {self.examples} images"


def evaluate_export(export_dir, paths, labels):
    """Accuracy and AUROC of the SavedModel's classify signature on image files.

    A K-class export (a `probabilities` output): accuracy of its label, and
    the macro AUROC, the mean one-vs-rest AUROC over the classes present
    with others (None when fewer than two classes are present).
    """
    model = LoadedModel(export_dir)
    try:
        probabilities = []
        for start in range(0, len(paths), EVAL_BATCH):
            batch = []
            for path in paths[start : start + EVAL_BATCH]:
                with open(path, "rb") as file:
                    batch.append(file.read())
            outputs = model.run("classify", {"image_bytes": np.array(batch, dtype=object)})
            probabilities.append(outputs.get("probabilities", outputs.get("probability")))
    finally:
        model.close()
    probability = np.concatenate(probabilities)
    labels = np.asarray(labels)
    if probability.ndim == 2:
        return _k_class_evaluation(probability, labels)
    accuracy = float(np.mean((probability >= 0.5).astype(np.int64) == labels))
    auroc = float(roc_auc_score(labels, probability)) if len(np.unique(labels)) == 2 else None
    return Evaluation(accuracy, auroc, len(labels))


def _k_class_evaluation(probabilities, labels):
    accuracy = float(np.mean(probabilities.argmax(axis=1) == labels))
    per_class = [float(roc_auc_score(labels == klass, probabilities[:, klass]))
                 for klass in range(probabilities.shape[1]) if 0 < np.sum(labels == klass) < len(labels)]
    return Evaluation(accuracy, float(np.mean(per_class)) if per_class else None, len(labels))


def blessing(candidate, baseline, *, min_accuracy=0.0, min_auroc=CHANCE_AUROC, tolerance=0.01):
    """None if blessed, else the reason it is not.

    The AUROC must be above `min_auroc`: by default a model no better than
    chance is never served, not even as the first version (min_auroc=0 allows it).
    """
    if candidate.accuracy < min_accuracy:
        return f"accuracy {candidate.accuracy:.4f} is below --min-accuracy {min_accuracy}"
    if candidate.auroc is None:  # one class in the evaluation split: only a stricter bar than chance refuses
        if min_auroc > CHANCE_AUROC:
            return f"AUROC is undefined (the evaluation split holds one class), --min-auroc {min_auroc} asked for"
    elif min_auroc > 0 and candidate.auroc <= min_auroc:
        chance = " (chance)" if min_auroc == CHANCE_AUROC else ""
        return f"AUROC {candidate.auroc:.4f} is not above --min-auroc {min_auroc}{chance}"
    if baseline is not None:
        if candidate.accuracy < baseline.accuracy - tolerance:
            return (f"accuracy {candidate.accuracy:.4f} is worse than the served version's "
                    f"{baseline.accuracy:.4f} by more than --tolerance {tolerance}")
        if (candidate.auroc is not None and baseline.auroc is not None
                and candidate.auroc < baseline.auroc - tolerance):
            return (f"AUROC {candidate.auroc:.4f} is worse than the served version's "
                    f"{baseline.auroc:.4f} by more than --tolerance {tolerance}")
    return None


def served_baseline(base_dir, versions, paths, labels, log=print):
    """The evaluation of the version a server serves now: the highest one that loads and runs.

    A newest version that is corrupt is not served (TF Serving's availability-preserving policy
    keeps the previous one), so it is skipped instead of blocking every future push."""
    for version in reversed(versions):
        try:
            evaluation = evaluate_export(os.path.join(base_dir, str(version)), paths, labels)
        except Exception as error:
            log(f"[evaluate] version {version} cannot be evaluated, so it is not the served one; skipped: "
                f"{first_line(error)}")
            continue
        log(f"[evaluate] served version {version}: {evaluation.text()}")
        return evaluation
    return None


def copy_version(staging, base_dir, version):
    """The atomic push: a non-integer sibling, saved_model.pb written last, then a rename."""
    target = os.path.join(base_dir, str(version))
    if os.path.exists(target):
        raise PatchNetError(f"{target} already exists")
    os.makedirs(base_dir, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base_dir)
    try:
        for name in os.listdir(staging):
            if name == "saved_model.pb":
                continue
            source = os.path.join(staging, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(temporary, name))
            else:
                shutil.copy2(source, os.path.join(temporary, name))
        for root, _, files in os.walk(temporary):
            for name in files:
                fsync(os.path.join(root, name))
        shutil.copy2(os.path.join(staging, "saved_model.pb"), os.path.join(temporary, "saved_model.pb"))
        fsync(os.path.join(temporary, "saved_model.pb"))
        os.chmod(temporary, 0o755)  # mkdtemp's 0700 would hide it from a server running as another user
        os.rename(temporary, target)
        fsync(base_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


def write_models_config(base_dir, model_name, config_base_path=None):
    """Adds or updates `model_name` in models.config beside BASE (TF Serving's --model_config_file)."""
    path = os.path.join(os.path.dirname(os.path.abspath(base_dir)), "models.config")
    config = model_server_config_pb2.ModelServerConfig()
    if os.path.exists(path):
        with open(path) as file:
            text_format.Parse(file.read(), config)
    entries = config.model_config_list.config
    entry = next((entry for entry in entries if entry.name == model_name), None) or entries.add()
    entry.name = model_name
    # The path as the server sees it: the compose file mounts BASE's parent at /models.
    entry.base_path = config_base_path or f"/models/{os.path.basename(os.path.abspath(base_dir))}"
    entry.model_platform = "tensorflow"
    atomic_write_text(path, text_format.MessageToString(config))
    return path


def _next_version(base_dir):
    versions = list_versions(base_dir) if os.path.isdir(base_dir) else []
    return (max(versions) + 1) if versions else 1


def _validation_split(model_path, data_dir, val_fraction, seed, positive_class):
    """The run's own validation split when its train_config.json says how it was made."""
    run_dir = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    config = {**PAPER, **read_train_config(run_dir)}  # no run folder: train's defaults
    dataset = load_folder_dataset(
        data_dir, positive_class=positive_class or config["positive_class"],
        val_fraction=config["val_fraction"] if val_fraction is None else val_fraction,
        seed=config["seed"] if seed is None else seed,
    )
    return dataset.splits["val"]


def push(model_path, base_dir, *, data_dir, model_name=None, version=None, min_accuracy=0.0,
         min_auroc=CHANCE_AUROC, tolerance=0.01, heatmap_stride=1, val_fraction=None, seed=None,
         positive_class=None, config_base_path=None, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
         max_request_pixels=DEFAULT_MAX_REQUEST_PIXELS, log=print):
    """Runs every step; returns the pushed version (an int). Raises PushError on failure."""
    base_dir = os.path.abspath(base_dir)
    check_output_path(base_dir, "--base")  # before export, evaluation and validation, not after
    check_pixel_limits(max_image_pixels, max_request_pixels)
    model_name = model_name or os.path.basename(base_dir)
    version = version or _next_version(base_dir)
    if os.path.exists(os.path.join(base_dir, str(version))):
        raise PushError("push", f"{os.path.join(base_dir, str(version))} already exists")
    served = list_versions(base_dir) if os.path.isdir(base_dir) else []
    staging_root = tempfile.mkdtemp(prefix="patchnet-push-")
    staging = os.path.join(staging_root, "candidate")
    step = "evaluate"
    try:
        # The data first: a missing folder or class fails before the export, not after it.
        split = _validation_split(model_path, data_dir, val_fraction, seed, positive_class)

        step = "export"
        export_saved_model(model_path, staging, heatmap_stride=heatmap_stride,
                           max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels)
        log(f"[export] candidate SavedModel staged at {staging}")

        step = "evaluate"
        candidate = evaluate_export(staging, split.paths, split.labels)
        log(f"[evaluate] candidate: {candidate.text()}")
        baseline = served_baseline(base_dir, served, split.paths, split.labels, log)

        step = "bless"
        reason = blessing(candidate, baseline, min_accuracy=min_accuracy, min_auroc=min_auroc,
                          tolerance=tolerance)
        if reason:
            raise PatchNetError(reason)
        log("[bless] blessed")

        step = "warmup"
        samples = []
        for path in split.paths[:2]:
            with open(path, "rb") as file:
                samples.append(file.read())
        warmup_path = warmup.write_warmup_requests(staging, model_name, samples or None)
        log(f"[warmup] {os.path.relpath(warmup_path, staging)} written")

        step = "infra-validate"
        log(f"[infra-validate] {warmup.infra_validate(staging)}")

        step = "push"
        target = copy_version(staging, base_dir, version)
        config_path = write_models_config(base_dir, model_name, config_base_path)
        log(f"[push] version {version} at {target}; {config_path} updated")
        return version
    except PushError:
        raise
    except PatchNetError as error:
        raise PushError(step, str(error)) from None
    except Exception as error:  # anything unexpected still names its step
        raise PushError(step, f"{type(error).__name__}: {first_line(error)}") from error
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)


def run(args):
    version = push(
        args.model, args.base, data_dir=args.data, model_name=args.model_name, version=args.version,
        min_accuracy=args.min_accuracy, min_auroc=args.min_auroc, tolerance=args.tolerance,
        heatmap_stride=args.heatmap_stride, val_fraction=args.val_fraction, seed=args.seed,
        positive_class=args.positive_class, config_base_path=args.config_base_path,
        max_image_pixels=args.max_image_pixels, max_request_pixels=args.max_request_pixels,
    )
    print(f"pushed version {version} to {os.path.join(os.path.abspath(args.base), str(version))}")
