"""`patchnet demo` end to end: dataset, training, heatmaps, push, local server, gRPC."""

import os

import cv2

from patchnet_tf import cli


def test_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--epochs", "2", "--image-size", "32"]) == 0
    printed = capsys.readouterr().out
    for stage in range(1, 8):
        assert f"[{stage}/7]" in printed
    assert "heatmap AUROC" in printed and "P(inlay) = " in printed
    figure = cv2.imread(str(out / "heatmaps.png"))
    assert figure is not None and figure.shape[0] > 0
    assert os.path.isfile(out / "serving" / "patchnet" / "1" / "saved_model.pb")
    assert os.path.isfile(out / "serving" / "models.config")
    served = sorted(os.listdir(out / "served-heatmaps"))
    assert len([name for name in served if name.endswith("heatmap.png")]) == 2
