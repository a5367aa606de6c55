"""Every `Example:` in the public API's docstrings runs and prints what it says (docs/python-api.md).

The examples run with the standard `doctest` module, in their module's
namespace plus `np`, `tf` and `keras` (what the docstrings assume is
imported), with NORMALIZE_WHITESPACE and ELLIPSIS. They print shapes,
names and exact values, never floats that vary between runs or machines.
"""

import doctest
import inspect
import io

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_layers import LAYER_CLASSES

import patchnet_tf
from patchnet_tf import (
    atomic,
    augment,
    baselines,
    errors,
    explain,
    heatmaps,
    layers,
    metrics,
    model,
    precision,
    preprocessing,
    runs,
    synthetic,
)

ANNOTATED = (layers, model, preprocessing, augment, metrics, baselines, runs, atomic, explain, synthetic, errors,
             precision, heatmaps)
MODULES = (patchnet_tf, *ANNOTATED)
OPTIONS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _doctests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = []
    for module in MODULES:
        extraglobs = {"np": np, "tf": tf, "keras": keras}
        found += [test for test in finder.find(module, extraglobs=extraglobs) if test.examples]
    return {test.name: test for test in found}


DOCTESTS = _doctests()


@pytest.mark.parametrize("name", sorted(DOCTESTS))
def test_docstring_example(name):
    output = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    result = runner.run(DOCTESTS[name], out=output.write)
    assert result.attempted and not result.failed, output.getvalue()


def _documented(obj):
    return f"{obj.__module__}.{obj.__qualname__}" in DOCTESTS


def test_every_layer_builder_and_exported_name_has_an_example():
    builders = [
        function
        for module in MODULES
        for name, function in inspect.getmembers(module, inspect.isfunction)
        if name.startswith("build") and function.__module__ == module.__name__
    ]
    assert {"build_subnet", "build_patchnet", "build_cam", "build_vgg11", "build"} <= {f.__name__ for f in builders}
    exported = [getattr(patchnet_tf, name) for name in patchnet_tf.__all__]
    missing = [obj.__qualname__ for obj in [*LAYER_CLASSES.values(), *builders, *exported] if not _documented(obj)]
    assert not missing, f"no `>>>` example in the docstring of {sorted(set(missing))}"


def test_a_broken_example_fails():
    """The runner above reports a wrong output; a docstring that lies cannot pass."""

    def lies():
        """
        >>> 1 + 1
        3
        """

    test = doctest.DocTestFinder().find(lies, "lies", globs={})[0]
    result = doctest.DocTestRunner(optionflags=OPTIONS).run(test, out=io.StringIO().write)
    assert result.failed == 1


def _public_functions(module):
    """(qualified name, function) of the public functions, methods and constructors defined in `module`."""
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield f"{module.__name__}.{name}", obj
        elif inspect.isclass(obj):
            for method_name, method in vars(obj).items():
                method = getattr(method, "__func__", getattr(method, "fget", method))  # classmethod, property
                if inspect.isfunction(method) and (not method_name.startswith("_") or method_name in ("__init__", "__call__")):
                    yield f"{module.__name__}.{name}.{method_name}", method


@pytest.mark.parametrize("module", ANNOTATED, ids=lambda module: module.__name__)
def test_public_functions_are_annotated(module):
    unannotated = []
    for name, function in _public_functions(module):
        signature = inspect.signature(function)
        parameters = [
            parameter
            for parameter in signature.parameters.values()
            if parameter.name not in ("self", "cls") and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        ]
        if signature.return_annotation is signature.empty or any(p.annotation is p.empty for p in parameters):
            unannotated.append(name)
    assert not unannotated, f"add type annotations to {unannotated}"
