"""float32 against bfloat16 on this CPU: training steps and heatmaps, for the paper's subnet and compare's.

    python -m bench.precision          # about 3 minutes on 2 cores

For each model (the paper's valid 7 x 64 subnet at p = 21, and `patchnet
compare`'s 3 x 16 at p = 15, stride 3) it times, float32 and bfloat16 paired
in one run: a Keras training step (batch 8 of 64 x 64 images, Adam) and a
stride-1 heatmap of one 192 x 256 image; it reports the bfloat16 map's
largest and mean absolute difference from the float32 map, the CPU's
bfloat16 flags, and what `--mixed-precision auto` / `precision="auto"`
resolve to here. On a CPU without AMX or AVX512-BF16 TensorFlow emulates
bfloat16, so the ratios there show why `auto` keeps float32. Writes
bench/results/precision.json.
"""

import keras
import numpy as np

from bench.common import environment, paired, print_table, write_json
from patchnet_tf import build_patchnet, heatmap
from patchnet_tf.precision import cpu_bfloat16_flags, resolve_precision, with_compute_dtype

MODELS = {
    "paper 7x64 valid p21": dict(patch_size=21, filters=64, conv_layers=7, padding="valid"),
    "compare 3x16 valid p15 s3": dict(patch_size=15, stride=3, filters=16, conv_layers=3, padding="valid"),
}


def trainable(options, policy, images, labels):
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = build_patchnet(**options)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
        model.train_on_batch(images, labels)  # traces the step
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model


def main():
    rng = np.random.default_rng(0)
    images = rng.random((8, 64, 64, 3), dtype=np.float32)
    labels = (np.arange(8) % 2).astype(np.float32)[:, None]
    big = rng.random((1, 192, 256, 3), dtype=np.float32)
    flags = cpu_bfloat16_flags()
    rows = []
    for name, options in MODELS.items():
        float32 = trainable(options, "float32", images, labels)
        bfloat16 = trainable(options, "mixed_bfloat16", images, labels)
        step = paired(lambda f=float32: f.train_on_batch(images, labels),
                      lambda b=bfloat16: b.train_on_batch(images, labels), pairs=3)
        as_bfloat16 = with_compute_dtype(float32, "bfloat16")
        maps = {"float32": heatmap(float32, big), "bfloat16": heatmap(as_bfloat16, big)}
        map_time = paired(lambda f=float32: heatmap(f, big), lambda b=as_bfloat16: heatmap(b, big), pairs=2)
        difference = np.abs(maps["bfloat16"] - maps["float32"])
        rows.append({
            "model": name,
            "step_float32_s": step["a"]["median_s"], "step_bfloat16_s": step["b"]["median_s"],
            "step_speedup": 1 / step["ratio_b_over_a"], "step_cpu_speedup": 1 / step["cpu_ratio_b_over_a"],
            "map_float32_s": map_time["a"]["median_s"], "map_bfloat16_s": map_time["b"]["median_s"],
            "map_speedup": 1 / map_time["ratio_b_over_a"], "map_cpu_speedup": 1 / map_time["cpu_ratio_b_over_a"],
            "map_max_abs_diff": float(difference.max()), "map_mean_abs_diff": float(difference.mean()),
            "auto": resolve_precision("auto", float32),
        })
    print_table(
        f"bench.precision: CPU bfloat16 flags: {', '.join(sorted(flags)) or 'none'}", rows,
        [("model", "model"), ("step_float32_s", "step f32 s"), ("step_bfloat16_s", "step bf16 s"),
         ("step_speedup", "step f32/bf16"), ("step_cpu_speedup", "CPU f32/bf16"), ("map_float32_s", "map f32 s"),
         ("map_bfloat16_s", "map bf16 s"), ("map_speedup", "map f32/bf16"), ("map_cpu_speedup", "CPU f32/bf16"),
         ("map_max_abs_diff", "map max |diff|"), ("map_mean_abs_diff", "map mean |diff|"), ("auto", "auto picks")],
    )
    write_json("precision", {"environment": environment(), "cpu_bfloat16_flags": sorted(flags), "rows": rows})


if __name__ == "__main__":
    main()
