"""`patchnet demo`: the whole job on the bundled texture dataset.

generate the dataset -> train (keras fit) -> test accuracy and heatmap AUROC
against the inlay masks -> heatmap PNGs -> export a SavedModel -> push it
(blessed, infra-validated) -> start the local TF-Serving-compatible server ->
call `classify` and `heatmap` over gRPC -> stop the server.
"""

import os
import time

from patchnet_tf.atomic import check_output_path
from patchnet_tf.metrics import format_number, format_percent
from pipelines.settings import CPU, cpu_stride

MODEL_NAME = "patchnet"
HOST = "127.0.0.1"  # the local server's address


class Stages:
    """Prints '[n/7] stage ...' and how long each stage took."""

    def __init__(self, total):
        self.total, self.index, self.started = total, 0, time.monotonic()

    def __call__(self, title):
        self.index += 1
        print(f"\n[{self.index}/{self.total}] {title}  (t = {time.monotonic() - self.started:.0f} s)", flush=True)


def run(args):
    from pipelines.compare import figure_grid, write_png
    from pipelines.data import load_folder_dataset
    from pipelines.evaluate import evaluate_model, format_results, load_run, mask_pairs, masked_heatmaps
    from pipelines.push import push
    from pipelines.textures import write_texture_dataset
    from pipelines.train import MODEL_NAME as MODEL_FILE
    from pipelines.train import check_flags, train
    from serving.client import predict, write_heatmaps
    from serving.server import check_port_free, start_server

    out = os.path.abspath(args.out)
    check_output_path(out, "--out")
    data, run_dir = os.path.join(out, "data"), os.path.join(out, "run")
    # `patchnet compare`'s PatchNet: a CPU-sized subnet (the paper's is 7 x 64); every other
    # flag (normalization, border patches, patience after the plateau) is `patchnet train`'s default.
    config = {**CPU, "data": data, "out": run_dir, "patch_size": args.patch_size, "padding": args.padding,
              "stride": cpu_stride(args.padding), "image_size": args.image_size, "epochs": args.epochs,
              "seed": args.seed}
    # Every flag before the dataset is written, and the port the server takes after training.
    check_flags(config)
    check_port_free(HOST, args.port)
    stage = Stages(7)

    stage("bundled dataset: grey scikit-image textures with brick inlays (class 1) and their masks")
    write_texture_dataset(data, image_size=args.image_size, seed=args.seed)
    print(f"  {data}")

    stage(f"train PatchNet-{args.patch_size} ({args.padding} padding) with keras fit")
    train(config)
    model_path = os.path.join(run_dir, MODEL_FILE)

    stage("test split: accuracy, and heatmap AUROC against the inlay masks")
    model, preprocessing, _ = load_run(model_path)
    test = load_folder_dataset(data).splits["test"]
    results = evaluate_model(model, preprocessing, test, masks_dir=os.path.join(data, "masks"))
    results["split"] = "test"
    print("  " + format_results(results).replace("\n", "\n  "))

    stage("heatmaps: image | inlay mask | PatchNet heatmap (white = inlay evidence)")
    inlays = [path for path, label in zip(test.paths, test.labels) if label == 1][:4]
    images, heatmaps, masks = masked_heatmaps(model, preprocessing, mask_pairs(inlays, os.path.join(data, "masks")))
    figure = os.path.join(out, "heatmaps.png")
    write_png(figure, figure_grid(images, masks, [heatmaps], [f"PatchNet-{args.patch_size}"]))
    print(f"  {figure}")

    stage("export a SavedModel (classify, heatmap, classify_images, heatmap_images) and push it")
    base = os.path.join(out, "serving", MODEL_NAME)
    # Whatever the run learned is pushed, to show the whole path (push alone refuses chance level).
    version = push(model_path, base, data_dir=data, model_name=MODEL_NAME, min_auroc=0.0,
                   log=lambda line: print("  " + line))

    stage("serve it with the local TF-Serving-compatible gRPC server")
    server = start_server(base, MODEL_NAME, HOST, args.port)
    try:
        server.wait_for_version(version)
        print(f"  serving {MODEL_NAME} version {version} on {server.address}")

        stage("call classify and heatmap over gRPC")
        queries = [test.paths[0], inlays[0]]
        for prediction in predict(server.address, MODEL_NAME, queries, "classify"):
            print(f"  classify {os.path.basename(prediction.image)}: "
                  f"P(inlay) = {prediction.probability:.3f}, label {prediction.label}")
        answers = predict(server.address, MODEL_NAME, queries, "heatmap")
        written = write_heatmaps(answers, os.path.join(out, "served-heatmaps"))
        print(f"  heatmap signature: {len(answers)} maps of {answers[0].heatmap.shape}, written to "
              f"{os.path.dirname(written[0])}")
    finally:
        server.stop()
    print(f"\nDone. Test accuracy {format_percent(results['accuracy'])}, heatmap AUROC "
          f"{format_number(results['masks']['auroc'])}. Figure: {figure}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'logs')}")
