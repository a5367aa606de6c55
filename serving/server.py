"""`patchnet serve`: a local gRPC server that answers like TensorFlow Serving.

For where `tensorflow_model_server` cannot run (development, tests, the
demo). It implements PredictionService.Predict, PredictionService.
GetModelMetadata and ModelService.GetModelStatus with the
tensorflow-serving-api protos, so `serving/client.py` (or any TF Serving
client) works against it unchanged. Its behaviour follows the real server:

- Versions are integer-named folders BASE/<version>/; anything else
  (a push's ".tmp-..." sibling, "latest", notes) is ignored, and a folder
  without saved_model.pb is never loaded. The base folder is polled, so a
  pushed version is picked up without a restart; by default only the latest
  version is served (TF Serving's `latest { num_versions: 1 }`). Versions
  load and unload as TF Serving's default availability-preserving policy
  has them (`ModelManager`): a broken or half-copied push never takes the
  serving version down, and a failed load is retried.
- A request without a version gets the latest loaded one; a specific
  version is served if it is loaded, else NOT_FOUND.
- Signatures run through the same session loader as TF Serving
  (`serving.loader.LoadedModel`).
- Status codes and messages as TF Serving's (SPEC section 6).
- `--rest-api-port`: TF Serving's REST API as well (`serving.rest`), answered by
  the same `predict` / `get_model_metadata` / `get_model_status` functions as gRPC.
- `--enable-batching`: concurrent requests merged into one session run
  (`serving.batching`), as TF Serving's `--enable_batching`.

Binds 127.0.0.1 unless --host says otherwise; SIGTERM stops it cleanly.
"""

import concurrent.futures
import dataclasses
import logging
import os
import signal
import threading
import time

import grpc
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
    predict_pb2,
)

from patchnet_tf.flag_types import nonnegative_int, port_number, positive_float, positive_int
from patchnet_tf.errors import PatchNetError
from serving.batching import BatchingOptions, BatchScheduler, read_batching_parameters
from serving.loader import DEFAULT_SIGNATURE, WARMUP_PATH, LoadedModel, SignatureError, first_line
from serving.warmup import replay_warmup

LOG = logging.getLogger("patchnet.serve")
DEFAULT_PORT = 8500


def list_versions(base_dir):
    """Integer-named subfolders holding saved_model.pb, as TF Serving's file system source sees them."""
    try:
        names = os.listdir(base_dir)
    except FileNotFoundError:
        return []
    versions = []
    for name in names:
        # TF Serving parses the folder name as an int64; "01" is 1, "-1" and "v1" are ignored.
        if not name.isdigit():
            continue
        if os.path.isfile(os.path.join(base_dir, name, "saved_model.pb")):
            versions.append(int(name))
    return sorted(versions)


def _load_and_warm_up(path):
    """As TF Serving: a version takes traffic only after its warmup requests (if any) ran."""
    loaded = LoadedModel(path)
    if os.path.isfile(os.path.join(path, WARMUP_PATH)):
        try:
            replay_warmup(loaded, path)
        except Exception:
            loaded.close()
            raise
    return loaded


@dataclasses.dataclass
class LoadFailure:
    """A version that failed to load: retried every `interval` until `attempts` exceed the retries."""

    code: str  # gRPC status name of the load error
    message: str
    attempts: int
    retry_at: float  # time.monotonic()
    gave_up: bool


class ModelManager:
    """Loads and unloads the versions of one model by polling its base folder, as TF Serving's
    default AvailabilityPreservingPolicy does (core/availability_preserving_policy.cc):

    - the latest `num_versions` versions on disk are aspired; the highest new one loads first;
    - a version no longer aspired is unloaded only when no version is aspired, an aspired one is
      serving, or another unaspired one still serves, so one broken push never empties the server;
    - a failed load is retried `max_load_retries` times, `load_retry_interval` seconds apart
      (--max_num_load_retries, --load_retry_interval_micros), then reported (GetModelStatus: END
      with the error) and left until the folder goes away.
    """

    def __init__(self, base_dir, model_name, *, num_versions=1, poll_seconds=1.0, max_load_retries=5,
                 load_retry_interval=60.0):
        self.base_dir = os.path.abspath(base_dir)
        self.model_name = model_name
        self.num_versions = num_versions
        self.poll_seconds = poll_seconds
        self.max_load_retries = max_load_retries
        self.load_retry_interval = max(0.0, load_retry_interval)
        self._loaded = {}  # version -> LoadedModel
        self._failures = {}  # version -> LoadFailure
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()  # one poll at a time (the poller and explicit calls)
        self._stop = threading.Event()
        self._thread = None

    def poll(self):
        """One pass: load the aspired versions that are due, then unload what the policy allows."""
        with self._poll_lock:
            self._poll()

    def _poll(self):
        on_disk = list_versions(self.base_dir)
        aspired = set(on_disk[-self.num_versions:])
        for version in sorted(aspired - set(self._loaded), reverse=True):
            failure = self._failures.get(version)
            if failure and (failure.gave_up or time.monotonic() < failure.retry_at):
                continue
            self._load(version, failure)
        while True:
            with self._lock:
                serving = set(self._loaded)
            unaspired = sorted(serving - aspired)
            if not unaspired or (aspired and not aspired & serving and len(unaspired) == 1):
                break
            with self._lock:
                self._loaded.pop(unaspired[0])
            # Not closed here: requests in flight still hold it; the session closes when collected.
            LOG.info("model %s version %d unloaded", self.model_name, unaspired[0])
        with self._lock:
            for version in set(self._failures) - set(on_disk):
                self._failures.pop(version)

    def _load(self, version, failure):
        path = os.path.join(self.base_dir, str(version))
        try:
            loaded = _load_and_warm_up(path)
        except Exception as error:  # a broken version must not stop the server
            attempts = failure.attempts + 1 if failure else 1
            gave_up = attempts > self.max_load_retries
            code = _status_name(error) if isinstance(error, tf.errors.OpError) else "UNKNOWN"
            with self._lock:
                self._failures[version] = LoadFailure(code, first_line(error), attempts,
                                                      time.monotonic() + self.load_retry_interval, gave_up)
            LOG.error("model %s version %d failed to load (attempt %d of %d%s): %s", self.model_name, version,
                      attempts, self.max_load_retries + 1, ", giving up" if gave_up else "", first_line(error))
            return
        with self._lock:
            self._failures.pop(version, None)
            self._loaded[version] = loaded
        LOG.info("model %s version %d loaded from %s", self.model_name, version, path)

    def start(self):
        self.poll()
        self._thread = threading.Thread(target=self._poll_loop, name="version-poller", daemon=True)
        self._thread.start()

    def _poll_loop(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:
                LOG.exception("polling %s failed", self.base_dir)

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            loaded, self._loaded = self._loaded, {}
        for model in loaded.values():
            model.close()

    def versions(self):
        with self._lock:
            return sorted(self._loaded)

    def statuses(self):
        """{version: (state name, LoadFailure or None)} as GetModelStatus reports them."""
        with self._lock:
            states = {version: ("AVAILABLE", None) for version in self._loaded}
            for version, failure in self._failures.items():
                states.setdefault(version, ("END" if failure.gave_up else "LOADING", failure))
        return states

    def get(self, model_spec):
        """(version, LoadedModel) for a ModelSpec; raises SignatureError NOT_FOUND as TF Serving does."""
        name = model_spec.name
        requested = model_spec.version.value if model_spec.HasField("version") else None
        if not name:  # TF Serving: model_servers/server_core.cc
            raise SignatureError("INVALID_ARGUMENT", "ModelSpec has no name specified.")
        if model_spec.version_label:
            raise SignatureError(
                "INVALID_ARGUMENT",
                f"version_label {model_spec.version_label!r} is not supported by this server; use version",
            )
        with self._lock:
            if name == self.model_name and self._loaded:
                if requested is None:
                    version = max(self._loaded)
                    return version, self._loaded[version]
                if requested in self._loaded:
                    return requested, self._loaded[requested]
        request_text = f"Latest({name})" if requested is None else f"Specific({name}, {requested})"
        raise SignatureError("NOT_FOUND", f"Servable not found for request: {request_text}")


def _abort(context, code, message):
    context.abort(getattr(grpc.StatusCode, code), message)


def _status_name(error):
    """The gRPC status name of a TF OpError (their codes are the same numbers)."""
    for code in grpc.StatusCode:
        if code.value[0] == error.error_code:
            return code.name
    return "INTERNAL"


def predict(manager, request, run=None):
    """PredictionService.Predict for both front ends (gRPC and REST), so their codes and messages are one.

    `run(model, signature_name, inputs, output_filter)` runs the signature (default: LoadedModel.run; the
    batching scheduler's `run` with --enable_batching). Returns a PredictResponse; raises SignatureError
    with TF Serving's status code.
    """
    if not request.HasField("model_spec"):
        raise SignatureError("INVALID_ARGUMENT", "Missing ModelSpec")
    version, model = manager.get(request.model_spec)
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    model.signature(signature_name)
    inputs = {}
    for key, proto in request.inputs.items():
        try:
            if any(dim.size < 0 for dim in proto.tensor_shape.dim):  # Tensor::FromProto refuses these
                raise ValueError(f"negative dimension in {key}")
            inputs[key] = tf.make_ndarray(proto)
        except Exception:
            raise SignatureError("INVALID_ARGUMENT", f"tensor parsing error: {key}") from None
    try:
        if run is None:
            outputs = model.run(signature_name, inputs, request.output_filter)
        else:
            outputs = run(model, signature_name, inputs, request.output_filter)
    except tf.errors.OpError as error:
        message = first_line(error)
        named = [key for key in request.inputs if key in message]
        if not named:  # e.g. "Invalid PNG data": say which input it came from
            message = f"{', '.join(sorted(request.inputs))}: {message}"
        raise SignatureError(_status_name(error), message) from None
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = version
    response.model_spec.signature_name = signature_name
    for key, value in outputs.items():
        response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return response


def get_model_metadata(manager, request):
    """PredictionService.GetModelMetadata for both front ends; raises SignatureError."""
    # TF Serving checks the request before it looks the model up (get_model_metadata_impl.cc).
    if not request.HasField("model_spec"):
        raise SignatureError("INVALID_ARGUMENT", "Missing ModelSpec")
    fields = list(request.metadata_field)
    if not fields:
        raise SignatureError("INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one metadata_field")
    unsupported = [field for field in fields if field != "signature_def"]
    if unsupported:
        raise SignatureError("INVALID_ARGUMENT", f"Metadata field {unsupported[0]} is not supported")
    version, model = manager.get(request.model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in model.signatures.items():
        signature_map.signature_def[name].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = version
    response.metadata["signature_def"].Pack(signature_map)
    return response


def get_model_status(manager, request):
    """ModelService.GetModelStatus for both front ends; raises SignatureError."""
    if not request.HasField("model_spec"):
        raise SignatureError("INVALID_ARGUMENT", "Missing ModelSpec")
    spec = request.model_spec
    requested = spec.version.value if spec.HasField("version") else None
    statuses = manager.statuses() if spec.name == manager.model_name else {}
    if requested is not None:
        if requested not in statuses:
            raise SignatureError("NOT_FOUND", f"Could not find version {requested} of model {spec.name}")
        statuses = {requested: statuses[requested]}
    elif not statuses:
        raise SignatureError("NOT_FOUND", f"Could not find any versions of model {spec.name}")
    response = get_model_status_pb2.GetModelStatusResponse()
    for version, (state, failure) in sorted(statuses.items()):
        status = response.model_version_status.add()
        status.version = version
        status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
        status.status.SetInParent()  # TF Serving always sets it: error_code OK unless the load failed
        if failure is not None and failure.gave_up:  # TF Serving reports the load error once it gives up
            status.status.error_code = getattr(grpc.StatusCode, failure.code).value[0]
            status.status.error_message = failure.message
    return response


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager, run=None):
        self.manager = manager
        self.run = run

    def Predict(self, request, context):
        try:
            return predict(self.manager, request, self.run)
        except SignatureError as error:
            return _abort(context, error.code, error.message)

    def GetModelMetadata(self, request, context):
        try:
            return get_model_metadata(self.manager, request)
        except SignatureError as error:
            return _abort(context, error.code, error.message)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        try:
            return get_model_status(self.manager, request)
        except SignatureError as error:
            return _abort(context, error.code, error.message)

    def HandleReloadConfigRequest(self, request, context):
        return _abort(context, "UNIMPLEMENTED", "HandleReloadConfigRequest: this server serves one model")


class LocalServer:
    """A running server: `.port`, `.address`, `.rest_port`, `.versions()`, `.wait_for_version()`, `.stop()`."""

    def __init__(self, manager, grpc_server, host, port, rest=None, batcher=None):
        self.manager = manager
        self._server = grpc_server
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.model_name = manager.model_name
        self.rest = rest  # serving.rest.RestServer or None
        self.rest_port = rest.port if rest else None
        self.rest_url = f"http://{host}:{rest.port}" if rest else None
        self.batcher = batcher  # serving.batching.BatchScheduler or None

    def versions(self):
        return self.manager.versions()

    def wait_for_version(self, version=None, timeout=60.0):
        """Blocks until `version` (or any version) is loaded; returns the loaded versions."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            versions = self.versions()
            if (version is None and versions) or version in versions:
                return versions
            time.sleep(0.05)
        raise PatchNetError(
            f"model {self.model_name}: version {version if version is not None else 'any'} "
            f"not loaded within {timeout} s from {self.manager.base_dir}"
        )

    def stop(self, grace=5.0):
        """Finishes requests in flight (up to `grace` seconds), then unloads everything."""
        if self.rest is not None:
            self.rest.stop()
        self._server.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.stop()
        self.manager.stop()

    def wait(self):
        self._server.wait_for_termination()


def start_server(base_dir, model_name=None, host="127.0.0.1", port=0, *, poll_seconds=1.0,
                 num_versions=1, workers=8, max_load_retries=5, load_retry_interval=60.0,
                 rest_api_port=None, batching=None):
    """Starts serving BASE/<version> folders; port 0 picks a free port (see `.port`).

    rest_api_port: also answer TF Serving's REST API there (None: no REST; 0: any free port).
    batching: a serving.batching.BatchingOptions to merge concurrent requests (--enable_batching).
    """
    base_dir = os.path.abspath(base_dir)
    if not os.path.isdir(base_dir):
        raise PatchNetError(f"{base_dir}: no such model base folder (expected BASE/<version>/saved_model.pb)")
    if rest_api_port and rest_api_port == port:  # TF Serving refuses this too (model_servers/server.cc)
        raise PatchNetError(f"--rest-api-port {rest_api_port} must differ from --port")
    model_name = model_name or os.path.basename(base_dir)
    manager = ModelManager(base_dir, model_name, num_versions=num_versions, poll_seconds=poll_seconds,
                           max_load_retries=max_load_retries, load_retry_interval=load_retry_interval)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=[  # images and heatmaps exceed gRPC's 4 MB default, as in TF Serving
            ("grpc.max_send_message_length", 256 << 20),
            ("grpc.max_receive_message_length", 256 << 20),
            # gRPC's default SO_REUSEPORT let a second server share a port in use, silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    batcher = BatchScheduler(batching) if batching is not None else None
    run = batcher.run if batcher is not None else None
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(manager, run), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    try:  # before loading any model: a busy port fails in a second, not after the load
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        if batcher is not None:
            batcher.stop()
        raise PatchNetError(f"cannot bind {host}:{port} (in use or not a local address)")
    rest = None
    if rest_api_port is not None:
        from serving.rest import RestServer  # the REST front end calls back into this module

        try:
            rest = RestServer(manager, host, rest_api_port, run=run)
        except PatchNetError:
            server.stop(0)
            if batcher is not None:
                batcher.stop()
            raise
    manager.start()
    server.start()
    if rest is not None:
        rest.start()
    return LocalServer(manager, server, host, bound, rest, batcher)


def add_arguments(parser):
    parser.add_argument("base", help="model base folder holding <version>/saved_model.pb")
    parser.add_argument("--model-name", default=None, help="default: the base folder's name")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="gRPC port (0: any free port)")
    parser.add_argument("--poll-seconds", type=positive_float, default=1.0,
                        help="how often to look for new versions (TF Serving: --file_system_poll_wait_seconds)")
    parser.add_argument("--num-versions", type=positive_int, default=1,
                        help="serve the latest N versions (TF Serving's default policy is latest 1)")
    parser.add_argument("--workers", type=positive_int, default=8, help="concurrent requests")
    parser.add_argument("--max-num-load-retries", type=nonnegative_int, default=5,
                        help="retries of a failed version load before giving up (TF Serving's flag)")
    parser.add_argument("--load-retry-interval-micros", type=int, default=60_000_000,
                        help="microseconds between load retries; negative: no wait (TF Serving's flag)")
    parser.add_argument("--rest-api-port", type=port_number, default=0,
                        help="also serve TF Serving's REST API on this port; 0 (default): no REST, as "
                             "tensorflow_model_server (its Docker image passes 8501)")
    parser.add_argument("--enable-batching", action="store_true",
                        help="merge concurrent requests into one session run (TF Serving's --enable_batching)")
    parser.add_argument("--batching-parameters-file", default=None,
                        help="text-format BatchingParameters, e.g. serving/batching.config "
                             "(default: TF Serving's defaults)")


def run(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.batching_parameters_file and not args.enable_batching:
        raise PatchNetError("--batching-parameters-file is used only with --enable-batching")
    batching = None
    if args.enable_batching:
        batching = (read_batching_parameters(args.batching_parameters_file) if args.batching_parameters_file
                    else BatchingOptions())
    server = start_server(args.base, args.model_name, args.host, args.port,
                          poll_seconds=args.poll_seconds, num_versions=args.num_versions,
                          workers=args.workers, max_load_retries=args.max_num_load_retries,
                          load_retry_interval=args.load_retry_interval_micros / 1e6,
                          rest_api_port=args.rest_api_port or None, batching=batching)
    stopped = threading.Event()

    def on_signal(signum, frame):
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    versions = server.versions()
    print(f"serving model {server.model_name} from {server.manager.base_dir} on {server.address} "
          f"(versions: {', '.join(map(str, versions)) or 'none yet, polling'})"
          + (f"; REST API on {server.rest_url}" if server.rest_url else "")
          + ("; batching on" if server.batcher else ""), flush=True)
    while not stopped.wait(0.5):
        pass
    print("stopping: finishing requests in flight", flush=True)
    server.stop()
    print("stopped", flush=True)
