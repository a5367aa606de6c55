"""bfloat16 where the CPU computes it natively: detection, `auto`, and how far bfloat16 maps drift."""

import numpy as np
import pytest
import tensorflow as tf

from patchnet_tf import build_patchnet, filter_heatmaps, heatmap
from patchnet_tf.baselines import build
from patchnet_tf.explain import explain
from patchnet_tf.model import FLOAT32_LAYERS
from patchnet_tf.precision import (
    PRECISIONS,
    cpu_bfloat16_flags,
    resolve_precision,
    subnet_filters,
    with_compute_dtype,
)
from pipelines.flags import MAP_PRECISIONS

AMX = frozenset({"amx_bf16"})


def test_the_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert cpu_bfloat16_flags(str(cpuinfo)) == {"avx512_bf16", "amx_bf16"}
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 fma avx avx2\n")
    assert cpu_bfloat16_flags(str(cpuinfo)) == frozenset()
    assert cpu_bfloat16_flags(str(tmp_path / "absent")) == frozenset()


def test_auto_is_bfloat16_only_for_a_wide_subnet_on_a_cpu_with_the_instructions():
    wide = build_patchnet(5, filters=32, conv_layers=1, padding="valid")
    narrow = build_patchnet(5, filters=16, conv_layers=1, padding="valid")
    assert subnet_filters(wide) == 32 and subnet_filters(narrow) == 16
    assert resolve_precision("auto", wide, cpu_flags=AMX) == "bfloat16"
    assert resolve_precision("auto", narrow, cpu_flags=AMX) == "float32"
    assert resolve_precision("auto", wide, cpu_flags=frozenset()) == "float32"  # instructions absent
    assert resolve_precision("bfloat16", narrow, cpu_flags=frozenset()) == "bfloat16"  # asked for: given
    with pytest.raises(ValueError, match="float16"):
        resolve_precision("float16", wide)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_bfloat16_maps_stay_close_to_float32_maps(padding):
    model = build_patchnet(7, filters=16, conv_layers=2, padding=padding)
    images = np.random.default_rng(3).random((2, 24, 28, 3), dtype=np.float32)
    as_bfloat16 = with_compute_dtype(model, "bfloat16")
    assert as_bfloat16.get_layer("subnet").layers[1].compute_dtype == "bfloat16"
    float32_maps, bfloat16_maps = heatmap(model, images), heatmap(as_bfloat16, images)
    assert bfloat16_maps.dtype == np.float32
    difference = np.abs(bfloat16_maps - float32_maps)
    assert 0 < difference.max() < 0.02 and difference.mean() < 0.005  # bfloat16 keeps 8 bits of mantissa
    # Back to float32: the very same numbers (the weights were copied, never rounded).
    np.testing.assert_array_equal(heatmap(with_compute_dtype(as_bfloat16, "float32"), images), float32_maps)


@pytest.mark.parametrize("classes", [1, 3])
def test_bfloat16_maps_and_probabilities_keep_the_tail_after_the_convs_in_float32(classes):
    # bfloat16 probabilities would sit on a 2^-8 grid near 0.5 to 1: ties that blunt a map's mask AUROC.
    model = build_patchnet(7, filters=16, conv_layers=2, padding="valid", classes=classes)
    as_bfloat16 = with_compute_dtype(model, "bfloat16")
    subnet = as_bfloat16.get_layer("subnet")
    assert [subnet.get_layer(name).compute_dtype for name in ("conv1", "conv2")] == ["bfloat16"] * 2
    tail = [layer for layer in (*subnet.layers, *as_bfloat16.layers) if layer.name in FLOAT32_LAYERS]
    assert sorted(layer.name for layer in tail) == sorted(FLOAT32_LAYERS)
    assert {layer.compute_dtype for layer in tail} == {"float32"}
    assert with_compute_dtype(as_bfloat16, "bfloat16") is as_bfloat16
    assert subnet.output.dtype == "float32"  # patch probabilities reach the image average unrounded
    maps = heatmap(as_bfloat16, np.random.default_rng(5).random((1, 20, 24, 3), dtype=np.float32))
    on_bfloat16_grid = tf.cast(tf.cast(maps, tf.bfloat16), tf.float32).numpy() == maps
    assert on_bfloat16_grid.mean() < 0.5


def test_heatmap_computes_at_the_precision_asked_and_auto_keeps_a_narrow_subnet_exact():
    model = build_patchnet(7, filters=16, conv_layers=2, padding="valid")
    images = np.random.default_rng(4).random((1, 20, 24, 3), dtype=np.float32)
    float32_maps = heatmap(model, images)
    np.testing.assert_array_equal(heatmap(model, images, precision="auto"), float32_maps)  # 16 filters: float32
    bfloat16_maps = heatmap(model, images, precision="bfloat16")
    assert bfloat16_maps.dtype == np.float32 and 0 < np.abs(bfloat16_maps - float32_maps).max() < 0.02
    features = filter_heatmaps(model, images, precision="bfloat16")
    assert features.dtype == np.float32 and np.abs(features - filter_heatmaps(model, images)).max() < 0.05
    cam, cam_images = build("cam", (16, 24, 3), width=4), images[:, :16]
    cam_maps = explain(cam, cam_images)
    assert np.abs(explain(cam, cam_images, precision="bfloat16") - cam_maps).max() < 0.05
    assert with_compute_dtype(cam, "bfloat16").get_layer("probability").compute_dtype == "float32"


def test_the_commands_offer_the_library_precisions():
    assert MAP_PRECISIONS == PRECISIONS
