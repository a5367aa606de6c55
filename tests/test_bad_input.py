"""Bad input to every command, as a new user types it: one line naming the input, exit 2, nothing left.

Each case runs `python -m patchnet_tf ...` in a subprocess, as a user would, and checks: exit status 2,
exactly one line on stderr, no traceback, the line names what was wrong, and the folder the command
would write to is absent or unchanged afterwards. The cases run two at a time (one per core).
"""

import concurrent.futures
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from patchnet_tf import baselines, cli
from patchnet_tf.errors import MissingSplit, PatchNetError
from patchnet_tf.synthetic import write_appendix_a_dataset
from pipelines.data import load_dataset
from pipelines.evaluate import load_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--patch-size", "9", "--filters", "4", "--conv-layers", "2", "--image-size", "32", "--batch-size", "4"]
TINY_COMPARE = ["--patch-size", "9", "--filters", "4", "--conv-layers", "2", "--epochs", "1"]

# (case id, argv with {placeholders}, text the one error line must contain, the output path that must not change)
CASES = [
    # --- arguments (rule 1 and 2: refused before any work)
    ("unknown-command", ["fly"], "invalid choice: 'fly'", None),
    ("train-epochs-word", ["train", "{data}", "--out", "{new}", "--epochs", "many"], "--epochs", "{new}"),
    ("train-learning-rate-inf", ["train", "{data}", "--out", "{new}", "--learning-rate", "inf"], "--learning-rate", "{new}"),
    ("train-learning-rate-nan", ["train", "{data}", "--out", "{new}", "--learning-rate", "nan"], "--learning-rate", "{new}"),
    ("train-rotation-nan", ["train", "{data}", "--out", "{new}", "--rotation", "nan"], "--rotation", "{new}"),
    ("train-zoom-below-1", ["train", "{data}", "--out", "{new}", "--zoom", "0.5"], "--zoom", "{new}"),
    ("train-val-fraction-1", ["train", "{data}", "--out", "{new}", "--val-fraction", "1"], "--val-fraction", "{new}"),
    ("train-seed-negative", ["train", "{data}", "--out", "{new}", "--seed", "-1"], "--seed", "{new}"),
    ("train-image-size", ["train", "{data}", "--out", "{new}", "--image-size", "big"], "HEIGHTxWIDTH", "{new}"),
    ("train-padding", ["train", "{data}", "--out", "{new}", "--padding", "reflect"], "--padding", "{new}"),
    ("train-patch-over-image", ["train", "{data}", "--out", "{new}", *TINY, "--patch-size", "33"],
     "--patch-size 33 is larger than the image", "{new}"),
    ("train-patch-size-even", ["train", "{data}", "--out", "{new}", *TINY, "--patch-size", "8", "--epochs", "1"],
     "--patch-size 8: centred heatmaps need an odd patch size", "{new}"),
    ("train-valid-patch-too-small", ["train", "{data}", "--out", "{new}", *TINY, "--padding", "valid",
                                     "--patch-size", "5", "--conv-layers", "3", "--epochs", "1"],
     "--padding valid needs --patch-size above 2 x --conv-layers", "{new}"),
    ("train-region-over-image", ["train", "{data}", "--out", "{new}", *TINY, "--region", "40x40"], "--region", "{new}"),
    ("train-missing-data", ["train", "{tmp}/nowhere", "--out", "{new}"], "nowhere: no such data folder", "{new}"),
    ("train-out-is-file", ["train", "{data}", "--out", "{file}", *TINY, "--epochs", "1"], "{file}", "{file}"),
    ("train-corrupt-tiff", ["train", "{tiff_data}", "--out", "{new}", *TINY, "--epochs", "1"], "zz-broken.tif", "{new}"),
    ("train-bad-image", ["train", "{broken_data}", "--out", "{new}", *TINY, "--epochs", "1"],
     "zz-broken.png: missing or not a decodable image", "{new}"),
    ("train-skip-bad-empties-a-class", ["train", "{one_class_broken}", "--out", "{new}", *TINY, "--skip-bad"],
     "square", "{new}"),
    ("train-no-images", ["train", "{no_images}", "--out", "{new}", *TINY], "notes.txt", "{new}"),
    ("train-multiworker-without-tf-config", ["train", "{data}", "--out", "{new}", *TINY, "--strategy", "multiworker"],
     "TF_CONFIG", "{new}"),
    # --- heatmap
    ("heatmap-missing-image", ["heatmap", "{tmp}/gone.png", "--model", "{run}", "--out", "{new}"], "gone.png", "{new}"),
    ("heatmap-undecodable", ["heatmap", "{junk}", "--model", "{run}", "--out", "{new}"], "junk.png", "{new}"),
    ("heatmap-missing-model", ["heatmap", "{image}", "--model", "{tmp}/none.keras", "--out", "{new}"], "none.keras", "{new}"),
    ("heatmap-truncated-model", ["heatmap", "{image}", "--model", "{truncated}", "--out", "{new}"], "model.keras", "{new}"),
    ("heatmap-preprocessing-not-ours", ["heatmap", "{image}", "--model", "{odd_preprocessing}", "--out", "{new}"],
     "preprocessing.json: not a preprocessing.json of `patchnet train`", "{new}"),
    ("heatmap-filters-on-cam", ["heatmap", "{image}", "--model", "{cam}", "--out", "{new}", "--filters"],
     "--filters needs a PatchNet", "{new}"),
    ("heatmap-bad-file-in-folder", ["heatmap", "{broken_data}", "--model", "{run}", "--out", "{new}"],
     "zz-broken.png", "{new}"),
    ("heatmap-out-is-file", ["heatmap", "{image}", "--model", "{run}", "--out", "{file}"], "{file}", "{file}"),
    ("heatmap-stride-zero", ["heatmap", "{image}", "--model", "{run}", "--out", "{new}", "--stride", "0"], "--stride", "{new}"),
    # --- evaluate
    ("evaluate-corrupt-config", ["evaluate", "{corrupt_run}", "{data}"], "train_config.json", None),
    ("evaluate-json-is-folder", ["evaluate", "{run}", "{data}", "--json", "{tmp}"], "{tmp}", None),
    ("evaluate-threshold-nan", ["evaluate", "{run}", "{data}", "--threshold", "nan"], "--threshold", None),
    ("evaluate-missing-mask", ["evaluate", "{run}", "{data}", "--masks", "{tmp}"],
     "(--skip-unmasked leaves such images out", None),
    ("evaluate-missing-run", ["evaluate", "{tmp}/norun", "{data}"], "norun", None),
    ("evaluate-bad-image", ["evaluate", "{run}", "{split_broken}"], "zz-broken.png", None),
    # --- export and push
    ("export-missing-run", ["export", "{tmp}/norun", "--out", "{new}"], "norun", "{new}"),
    ("push-base-is-file", ["push", "{run}", "--base", "{file}", "--data", "{data}"], "{file}", "{file}"),
    ("push-min-auroc-2", ["push", "{run}", "--base", "{new}", "--data", "{data}", "--min-auroc", "2"], "--min-auroc", "{new}"),
    # --- serve and predict
    ("serve-port-out-of-range", ["serve", "{tmp}", "--port", "70000"], "--port", None),
    ("serve-port-in-use", ["serve", "{base}", "--port", "{busy_port}"], "{busy_port}", None),
    ("serve-host-not-an-address", ["serve", "{base}", "--port", "0", "--host", "999.1.1.1"], "999.1.1.1", None),
    ("serve-missing-base", ["serve", "{tmp}/nobase", "--port", "0"], "nobase", None),
    ("predict-no-server", ["predict", "{image}", "--model", "tiny", "--server", "127.0.0.1:{free_port}", "--wait", "0.5"],
     "127.0.0.1:{free_port}", None),
    ("predict-port-out-of-range", ["predict", "{image}", "--model", "tiny", "--server", "localhost:99999", "--wait", "30"],
     "argument --server: expected host:port with a port from 1 to 65535", None),
    ("predict-missing-image", ["predict", "{tmp}/gone.png", "--model", "tiny", "--server", "127.0.0.1:{free_port}"],
     "gone.png", None),
    ("predict-retries-negative", ["predict", "{image}", "--model", "tiny", "--retries", "-1"], "--retries", None),
    # --- multi-run commands: everything checked before the first run trains
    ("compare-image-too-small", ["compare", "{data}", "--out", "{new}", *TINY_COMPARE, "--image-size", "8", "--masks", "{tmp}"],
     "--image-size", "{new}"),
    ("compare-cell-too-big", ["compare", "{data}", "--out", "{new}", *TINY_COMPARE, "--image-size", "32",
                              "--padding", "same", "--masks", "{masks}", "--cell", "100000"], "--cell", "{new}"),
    ("compare-out-is-file", ["compare", "{data}", "--out", "{file}", *TINY_COMPARE, "--masks", "{tmp}"], "{file}", "{file}"),
    ("compare-missing-mask", ["compare", "{data}", "--out", "{new}", *TINY_COMPARE, "--masks", "{tmp}"], "no mask", "{new}"),
    ("sweep-a-later-patch-too-big", ["sweep", "{data}", "--out", "{new}", *TINY, "--patch-sizes", "3,41"],
     "--patch-size 41 is larger", "{new}"),
    ("sweep-a-later-run-cannot-resume", ["sweep", "{data}", "--out", "{sweep_conflict}", *TINY, "--epochs", "1",
                                         "--archs", "patchnet,cam"],
     "cam holds a run with different settings", "{sweep_conflict}"),
    ("sweep-learning-rate-nan", ["sweep", "{data}", "--out", "{new}", *TINY, "--epochs", "1",
                                 "--learning-rates", "1e-3,nan"], "--learning-rates", "{new}"),
    ("sweep-same-run-twice", ["sweep", "{data}", "--out", "{new}", *TINY, "--epochs", "1", "--patch-sizes", "9,9"],
     "same run folder patchnet-9", "{new}"),
    ("sweep-bad-image", ["sweep", "{broken_data}", "--out", "{new}", *TINY, "--epochs", "1"], "zz-broken.png", "{new}"),
    ("sweep-missing-data", ["sweep", "{tmp}/nowhere", "--out", "{new}"], "nowhere", "{new}"),
    ("demo-patch-too-big", ["demo", "--out", "{new}", "--epochs", "1", "--patch-size", "99"],
     "--patch-size 99 is larger than the image", "{new}"),
    ("demo-port-in-use", ["demo", "--out", "{new}", "--epochs", "1", "--port", "{busy_port}"], "{busy_port}", "{new}"),
    ("demo-out-is-file", ["demo", "--out", "{file}"], "{file}", "{file}"),
    ("export-out-is-file", ["export", "{run}", "--out", "{file}"], "{file}", "{file}"),
    ("predict-out-is-file", ["predict", "{image}", "--model", "tiny", "--signature", "heatmap", "--out", "{file}"],
     "{file}", "{file}"),
    # --- bulk
    ("bulk-missing-model", ["bulk", "{image}", "--model", "{tmp}/norun", "--out", "{new}"], "norun", "{new}"),
    ("bulk-unknown-beam-option", ["bulk", "{image}", "--model", "{run}", "--out", "{new}", "--flink_mastr=host:8081"],
     "unrecognized arguments: --flink_mastr=host:8081", "{new}"),
    ("bulk-beam-option-bad-value", ["bulk", "{image}", "--model", "{run}", "--out", "{new}",
                                    "--direct_num_workers=many"], "--direct_num_workers: invalid int value", "{new}"),
    ("bulk-truncated-model", ["bulk", "{image}", "--model", "{truncated}", "--out", "{new}"], "model.keras", "{new}"),
    ("bulk-out-is-file", ["bulk", "{image}", "--model", "{run}", "--out", "{file}"], "{file}: exists and is not a folder",
     "{file}"),
    ("bulk-unknown-runner", ["bulk", "{image}", "--model", "{run}", "--out", "{new}", "--runner", "Nope"],
     "--runner Nope: Unexpected pipeline runner", "{new}"),
    ("textures-root-is-file", ["pipelines.textures", "{file}"], "{file}", "{file}"),
    ("textures-image-too-small", ["pipelines.textures", "{new}", "--image-size", "2"], "--image-size 2x2", "{new}"),
]


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The files and folders the cases name: a dataset, runs, broken copies, a busy port."""
    tmp = tmp_path_factory.mktemp("bad-input")
    data = write_appendix_a_dataset(str(tmp / "data"), copies=4, image_size=32, square_size=16)
    run = str(tmp / "run")
    assert cli.main(["train", data, "--out", run, *TINY, "--epochs", "1"]) == 0
    places = {"tmp": str(tmp), "data": data, "run": run, "file": str(tmp / "a-file")}
    with open(places["file"], "w") as file:
        file.write("not a folder")
    places["image"] = os.path.join(data, "square", "000.png")
    places["junk"] = str(tmp / "junk.png")
    with open(places["junk"], "wb") as file:
        file.write(b"this is not a PNG")

    broken = shutil.copytree(data, tmp / "broken")
    (broken / "black" / "zz-broken.png").write_bytes(b"this is not a PNG")
    places["broken_data"] = str(broken)
    tiff_data = shutil.copytree(data, tmp / "tiff")
    (tiff_data / "black" / "zz-broken.tif").write_bytes(b"II*\x00 truncated")  # libtiff has its own error lines
    places["tiff_data"] = str(tiff_data)
    split_broken = tmp / "split-broken"
    for split in ("train", "val"):
        shutil.copytree(data, split_broken / split)
    (split_broken / "val" / "black" / "zz-broken.png").write_bytes(b"this is not a PNG")
    places["split_broken"] = str(split_broken)
    one_class_broken = shutil.copytree(data, tmp / "one-class-broken")
    for path in (one_class_broken / "square").iterdir():
        path.write_bytes(b"truncated")
    places["one_class_broken"] = str(one_class_broken)
    no_images = tmp / "no-images"
    for name in ("a", "b"):
        (no_images / name).mkdir(parents=True)
        (no_images / name / "notes.txt").write_text("not an image")
    places["no_images"] = str(no_images)

    truncated = shutil.copytree(run, tmp / "truncated")
    model_bytes = (truncated / "model.keras").read_bytes()
    (truncated / "model.keras").write_bytes(model_bytes[: len(model_bytes) // 2])
    places["truncated"] = str(truncated / "model.keras")
    corrupt_run = shutil.copytree(run, tmp / "corrupt-run")
    (corrupt_run / "train_config.json").write_text('{"patch_size": 9,')
    places["corrupt_run"] = str(corrupt_run)
    odd_preprocessing = shutil.copytree(run, tmp / "odd-preprocessing")
    (odd_preprocessing / "preprocessing.json").write_text('{"class_names": ["black", "square"]}')  # valid JSON
    places["odd_preprocessing"] = str(odd_preprocessing)
    masks = tmp / "masks"  # a mask (the image itself) for every image: compare gets past its mask checks
    masks.mkdir()
    for path in sorted(glob.glob(os.path.join(data, "*", "*.png"))):
        shutil.copy(path, masks)
    places["masks"] = str(masks)
    sweep_conflict = tmp / "sweep-conflict"
    shutil.copytree(run, sweep_conflict / "cam")  # a PatchNet run where the sweep's CAM run would go
    places["sweep_conflict"] = str(sweep_conflict)
    cam = tmp / "cam"
    cam.mkdir()
    baselines.build("cam", (32, 32, 3), width=1).save(str(cam / "model.keras"))
    shutil.copy(os.path.join(run, "preprocessing.json"), cam)
    places["cam"] = str(cam)
    base = tmp / "base" / "tiny"
    base.mkdir(parents=True)
    places["base"] = str(base)

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    places["busy_port"] = str(busy.getsockname()[1])
    places["free_port"] = str(_free_port())
    yield places
    busy.close()


def _flags_of(command):
    """Every option string of `patchnet COMMAND` (what its --help lists)."""
    parser = cli.command_parser(command)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    if command == "bulk":  # and every Beam pipeline option, which bulk passes on
        from apache_beam.options.pipeline_options import PipelineOptions

        flags |= {f"--{name}" for name in PipelineOptions([]).get_all_options()}
    return flags


# A flag named in a message (not a --name=value pattern, which bulk's Beam options are).
FLAG = re.compile(r"--[a-z][\w-]*\b(?![=\w-])")


def _snapshot(path):
    if path is None or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        with open(path, "rb") as file:
            return file.read()
    return sorted((folder, sorted(files)) for folder, _, files in os.walk(path))


@pytest.fixture(scope="module")
def outcomes(places):
    """Runs every case once (two at a time); {case id: (exit code, stderr lines, output before, after)}."""
    env = {key: value for key, value in os.environ.items() if key not in ("TF_CONFIG", "TF_CPP_MIN_LOG_LEVEL")}
    env["PYTHONPATH"] = ROOT

    def run(case):
        name, argv, _, watched = case
        names = {**places, "new": os.path.join(places["tmp"], f"out-{name}")}
        argv = [part.format(**names) for part in argv]
        out = watched.format(**names) if watched else None
        before = _snapshot(out)
        module = [] if argv[0].startswith("pipelines.") else ["patchnet_tf"]  # or `python -m pipelines.X`
        result = subprocess.run([sys.executable, "-m", *module, *argv], env=env, cwd=places["tmp"],
                                capture_output=True, text=True, timeout=600)
        return name, (result.returncode, result.stderr.strip().splitlines(), before, _snapshot(out))

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, CASES))


@pytest.mark.parametrize("name, argv, expected, watched", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_and_exit_2_and_leaves_nothing(outcomes, places, name, argv, expected, watched):
    code, lines, before, after = outcomes[name]
    expected = expected.format(**places)
    assert code == 2, (code, lines[-5:])
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    assert " error: " in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert after == before, f"{watched} changed"
    if argv[0] in cli.COMMANDS:  # rule 4: never suggest a flag the command does not have
        assert set(FLAG.findall(lines[0])) <= _flags_of(argv[0]), lines[0]


def _image_folders(root, names):
    """ROOT/<name>/a.png for each class name: a folder dataset whose images are never decoded."""
    for name in names:
        os.makedirs(os.path.join(root, name))
        with open(os.path.join(root, name, "a.png"), "wb"):
            pass
    return str(root)


def test_a_missing_split_is_its_own_error_type_with_the_same_message(tmp_path):
    # compare falls back from the test split to val on this type, not on the words of the message.
    data = _image_folders(tmp_path, ["train/inlay", "train/plain", "val/inlay", "val/plain"])
    with pytest.raises(MissingSplit, match=re.escape(f"{data}: no 'test' split (expected a {data}/test folder)")):
        load_split(data, SimpleNamespace(class_names=("plain", "inlay")), "test")


def test_data_without_the_models_positive_class_says_the_classes_differ(tmp_path):
    data = _image_folders(tmp_path, ["cats", "dogs"])
    with pytest.raises(PatchNetError) as raised:
        load_split(data, SimpleNamespace(class_names=("plain", "inlay")), "val")
    assert str(raised.value) == (f"{data}: its classes differ from the model's plain, inlay "
                                 "(--positive-class 'inlay' is not one of cats, dogs)")


def test_a_dataset_json_naming_classes_without_folders_blames_the_file(tmp_path):
    # Its second name used to become the positive class: "--positive-class 'dogs' is not one of ...",
    # a flag nobody gave.
    data = _image_folders(tmp_path, ["inlay", "plain"])
    (tmp_path / "dataset.json").write_text('{"class_names": ["cats", "dogs"]}')
    with pytest.raises(PatchNetError) as raised:
        load_dataset(data)
    assert str(raised.value) == (f"{data}/dataset.json: names classes with no folder: cats, dogs "
                                 "(the class folders are inlay, plain)")


def test_an_isic_csv_with_a_header_and_no_rows_says_it_has_no_rows(tmp_path):
    # It used to say it expected the columns image_id,melanoma, which it has.
    csv_path = tmp_path / "truth.csv"
    csv_path.write_text("image_id,melanoma,seborrheic_keratosis\n")
    with pytest.raises(PatchNetError) as raised:
        load_dataset(str(csv_path))
    assert str(raised.value) == f"{csv_path}: no rows below the header (one row per image)"
