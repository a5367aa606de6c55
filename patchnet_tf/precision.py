"""Compute precision: float32, or bfloat16 where the CPU computes it natively.

CPUs with AMX or AVX512-BF16 run bfloat16 convolutions several times faster
than float32 (a 7 x 64 subnet's forward pass 4x, its training step 3.6x);
on a CPU without them TensorFlow emulates bfloat16, slower than float32.
Small subnets gain nothing either way (3 x 16: 1.04x), because their cost
is not in the convolutions. `auto` therefore picks bfloat16 only where both
hold: the instructions are there (read from the CPU flags, not assumed) and
the subnet is wide. `python3 dev.py bench precision` measures both on the
machine at hand.
"""

from __future__ import annotations

import keras

from patchnet_tf.model import FLOAT32_LAYERS

# /proc/cpuinfo flags of the instructions that compute bfloat16 natively.
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Subnets with at least this many filters per conv layer gain from bfloat16.
WIDE_SUBNET_FILTERS = 32
PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_bfloat16_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The bfloat16 instructions this CPU reports (empty where there are none or no /proc/cpuinfo).

    Args:
        cpuinfo: the file listing the CPU flags.

    Returns:
        The subset of `BFLOAT16_CPU_FLAGS` present.
    """
    try:
        with open(cpuinfo) as file:
            for line in file:
                if line.startswith("flags"):
                    return frozenset(BFLOAT16_CPU_FLAGS).intersection(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def subnet_filters(model: keras.Model) -> int:
    """The widest convolution of the model's subnet (or of the model, for the baselines); 0 if none."""
    try:
        model = model.get_layer("subnet")
    except ValueError:
        pass
    widths = [layer.filters for layer in model._flatten_layers(include_self=False, recursive=True)
              if isinstance(layer, keras.layers.Conv2D)]
    return max(widths, default=0)


def bfloat16_pays(filters: int, *, cpu_flags: frozenset[str] | None = None) -> bool:
    """Whether a subnet of `filters` filters per conv layer computes faster in bfloat16 on this CPU.

    Args:
        filters: the subnet's widest convolution.
        cpu_flags: the CPU's bfloat16 flags (default: read from the CPU).

    Returns:
        True on a CPU with AMX or AVX512-BF16 for at least `WIDE_SUBNET_FILTERS` filters.
    """
    flags = cpu_bfloat16_flags() if cpu_flags is None else cpu_flags
    return bool(flags) and filters >= WIDE_SUBNET_FILTERS


def resolve_precision(choice: str, model: keras.Model, *, cpu_flags: frozenset[str] | None = None) -> str:
    """`auto`, `float32` or `bfloat16` -> the compute dtype to use for `model` on this CPU.

    Args:
        choice: one of `PRECISIONS`.
        model: the model that will compute.
        cpu_flags: the CPU's bfloat16 flags (default: read from the CPU).

    Returns:
        "float32" or "bfloat16". `auto` is "bfloat16" only on a CPU with AMX or AVX512-BF16 and for a
        subnet of at least `WIDE_SUBNET_FILTERS` filters.

    Example:

    >>> from patchnet_tf.model import build_patchnet
    >>> wide = build_patchnet(5, filters=64, conv_layers=1)
    >>> resolve_precision("auto", wide, cpu_flags=frozenset({"amx_bf16"}))
    'bfloat16'
    >>> resolve_precision("auto", wide, cpu_flags=frozenset())
    'float32'
    """
    if choice not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "bfloat16" if bfloat16_pays(subnet_filters(model), cpu_flags=cpu_flags) else "float32"


def with_compute_dtype(model: keras.Model, compute_dtype: str) -> keras.Model:
    """The same model computing in `compute_dtype` ("float32" or "bfloat16"), weights copied.

    Variables stay float32 (Keras's mixed policy), and so do PatchNet's tail
    after its convs and the probabilities (`patchnet_tf.model.FLOAT32_LAYERS`,
    which also names the baselines' output): rounded to bfloat16's 8-bit
    mantissa, the features and probabilities tie where float32's differ, and
    the ties blunt a map's ranking (its mask AUROC: docs/results/training.md). Other
    outputs are cast back to float32 by the caller where it needs them.
    Returns `model` itself when it already computes so.
    """
    policy = "float32" if compute_dtype == "float32" else f"mixed_{compute_dtype}"

    def computes_as_wanted(layer):
        if isinstance(layer, (keras.layers.InputLayer, keras.Model)):  # they keep their own dtype
            return True
        return layer.dtype_policy.name == ("float32" if layer.name in FLOAT32_LAYERS else policy)

    if all(computes_as_wanted(layer) for layer in model._flatten_layers(include_self=False, recursive=True)):
        return model

    def retyped(node):
        if isinstance(node, dict):
            if isinstance(node.get("config"), dict) and node["config"].get("name") in FLOAT32_LAYERS:
                return {**node, "config": {**node["config"], "dtype": "float32"}}
            if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
                return {**node, "config": {**node.get("config", {}), "name": policy}}
            return {key: retyped(value) for key, value in node.items()}
        if isinstance(node, list):
            return [retyped(value) for value in node]
        if isinstance(node, str) and node.startswith("mixed_"):  # a policy by name (inputs keep their dtype)
            return policy
        return node

    rebuilt = keras.saving.deserialize_keras_object(retyped(keras.saving.serialize_keras_object(model)))
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def at_precision(model: keras.Model, choice: str) -> keras.Model:
    """`model` computing at the precision `choice` resolves to here (`resolve_precision`), weights copied.

    Args:
        choice: one of `PRECISIONS`.
        model: the model to compute with.

    Returns:
        `model` itself when it already computes so, else a copy (`with_compute_dtype`).

    Example:

    >>> from patchnet_tf.model import build_patchnet
    >>> narrow = build_patchnet(5, filters=4, conv_layers=1)
    >>> conv = at_precision(narrow, "bfloat16").get_layer("subnet").get_layer("conv1")
    >>> at_precision(narrow, "auto") is narrow, conv.compute_dtype, conv.variable_dtype
    (True, 'bfloat16', 'float32')
    """
    return with_compute_dtype(model, resolve_precision(choice, model))

