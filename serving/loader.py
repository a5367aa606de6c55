"""Run a SavedModel the way tensorflow_model_server does.

TF Serving loads the MetaGraphDef tagged "serve" into a session
(`LoadSavedModel`, the C++ twin of `tf.compat.v1.saved_model.loader.load`)
and runs a signature by feeding and fetching the tensor names its
SignatureDef lists. This module does the same, so what passes here passes
there: no Keras, no `tf.saved_model.load`, no eager functions.
"""

import os
import threading

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.python.util import deprecation

from serving.errors import ServingError

SERVE_TAG = "serve"
DEFAULT_SIGNATURE = "serving_default"
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")


class LoadedModel:
    """One SavedModel version in its own graph and session (thread-safe runs)."""

    def __init__(self, export_dir, *, session_config=None):
        self.export_dir = export_dir
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph, config=session_config)
        # silence(): the TF1 loader's deprecation notice; TF Serving's C++ loader is this loader.
        with self.graph.as_default(), deprecation.silence():
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, [SERVE_TAG], export_dir)
        self.signature_defs = dict(meta_graph.signature_def)  # all, as GetModelMetadata lists them
        self.signatures = {  # the callable ones: __saved_model_init_op is not
            name: signature for name, signature in self.signature_defs.items() if not name.startswith("__")
        }
        self._closed = False
        self._retired = False
        self._holds = 0  # requests running on this version (TF Serving's ServableHandle count)
        self._lock = threading.Lock()

    def signature(self, name):
        name = name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            # TF Serving's wording (predict_util.cc), with FAILED_PRECONDITION.
            raise ServingError(
                "FAILED_PRECONDITION", f'Serving signature name: "{name}" not found in signature def'
            )
        return self.signatures[name]

    def check_inputs(self, signature_name, inputs):
        """Raises ServingError (INVALID_ARGUMENT) if `inputs` (name -> ndarray) do not fit."""
        signature = self.signature(signature_name)
        expected = sorted(signature.inputs)
        sent = sorted(inputs)
        if sent != expected:
            extra = [key for key in sent if key not in signature.inputs]
            missing = [key for key in expected if key not in inputs]
            if extra:
                # TF Serving: "input tensor alias not found in signature: X. Inputs expected to be in the set {Y}."
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"input tensor alias not found in signature: {', '.join(extra)}. "
                    f"Inputs expected to be in the set {{{','.join(expected)}}}.",
                )
            raise ServingError(
                "INVALID_ARGUMENT",
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({{{','.join(sent)}}}) != len({{{','.join(expected)}}}). "
                f"Missing but required: {{{','.join(missing)}}}.",
            )
        for key, value in inputs.items():
            info = signature.inputs[key]
            want = tf.dtypes.as_dtype(info.dtype)
            got = tf.dtypes.as_dtype(value.dtype) if value.dtype != object else tf.string
            if got != want:
                # TF Serving returns the session's "Expects arg[0] to be string but float is
                # provided"; the same, naming the input.
                raise ServingError(
                    "INVALID_ARGUMENT",
                    f"input {key}: expects {_type_name(want)} but {_type_name(got)} is provided",
                )
            if not info.tensor_shape.unknown_rank:
                dims = [dim.size for dim in info.tensor_shape.dim]
                shape_text = "[" + ", ".join("?" if d < 0 else str(d) for d in dims) + "]"
                if value.ndim != len(dims):
                    raise ServingError(
                        "INVALID_ARGUMENT",
                        f"input {key}: expected rank {len(dims)} {shape_text}, "
                        f"got shape {list(value.shape)} (rank {value.ndim})",
                    )
                for axis, (want_size, got_size) in enumerate(zip(dims, value.shape)):
                    if want_size >= 0 and want_size != got_size:
                        raise ServingError(
                            "INVALID_ARGUMENT",
                            f"input {key}: expected shape {shape_text}, got {list(value.shape)} "
                            f"(dimension {axis} must be {want_size})",
                        )
            if value.ndim >= 1 and value.shape[0] == 0:
                raise ServingError(
                    "INVALID_ARGUMENT", f"input {key}: empty batch; expected at least one example"
                )

    def run(self, signature_name, inputs, output_filter=()):
        """Feeds `inputs` (name -> ndarray) by SignatureDef tensor names; returns name -> ndarray.

        Raises ServingError for requests that do not fit the signature and
        tf.errors.OpError for errors inside the graph (e.g. undecodable bytes).
        """
        signature = self.signature(signature_name)
        self.check_inputs(signature_name, inputs)
        outputs = list(output_filter) or sorted(signature.outputs)
        unknown = [key for key in outputs if key not in signature.outputs]
        if unknown:
            raise ServingError(
                "INVALID_ARGUMENT",
                f"output tensor alias not found in signature: {', '.join(unknown)} "
                f"Outputs expected to be in the set {{{','.join(sorted(signature.outputs))}}}.",
            )
        duplicates = sorted({key for key in outputs if outputs.count(key) > 1})
        if duplicates:
            raise ServingError("INVALID_ARGUMENT", f"duplicate output tensor alias: {duplicates[0]}")
        feeds = {signature.inputs[key].name: value for key, value in inputs.items()}
        fetches = [signature.outputs[key].name for key in outputs]
        values = self.session.run(fetches, feed_dict=feeds)
        return dict(zip(outputs, values))

    @property
    def closed(self):
        return self._closed

    def acquire(self):
        """A request starts using this version; call while the server can still find it (under its lock)."""
        with self._lock:
            self._holds += 1

    def release(self):
        with self._lock:
            self._holds -= 1
            close = self._retired and self._holds == 0
        if close:
            self.close()

    def retire(self):
        """Unloaded: the session closes now if no request holds it, else when the last one releases it."""
        with self._lock:
            self._retired = True
            close = self._holds == 0
        if close:
            self.close()

    def close(self):
        with self._lock:
            if not self._closed:
                self._closed = True
                self.session.close()


def _type_name(dtype):
    """TensorFlow's DataTypeString: "float", "string", "int64", as TF Serving's messages say."""
    return types_pb2.DataType.Name(dtype.as_datatype_enum)[len("DT_"):].lower()


def first_line(error):
    """An OpError's message without the graph context TF appends."""
    message = getattr(error, "message", str(error))
    lines = [
        line for line in message.splitlines()
        if line.strip() and "{{node" not in line and line.strip() != "Graph execution error:"
    ]
    return " ".join(line.strip() for line in lines).strip() or message


def as_numpy_string_batch(values):
    return np.array(list(values), dtype=object)
