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
- Several models from a ModelServerConfig file (TF Serving's
  --model_config_file, the models.config `patchnet push` writes), each with
  its version policy (`latest N`, `all`, `specific`) and version labels,
  re-read when it changes (--model_config_file_poll_wait_seconds) or
  replaced by ModelService.HandleReloadConfigRequest (`ServerCore`).
- A request without a version gets the latest loaded one; a specific
  version (or the version a label names) is served if it is loaded, else
  NOT_FOUND. An unloaded version's session closes only after the requests
  holding it have finished.
- Signatures run through the same session loader as TF Serving
  (`serving.loader.LoadedModel`).
- Status codes and messages as TF Serving's (SPEC section 6); no message
  size cap below TF Serving's INT32_MAX unless --max-message-bytes says so.
- `--rest-api-port`: TF Serving's REST API as well (`serving.rest`), answered by
  the same `predict` / `get_model_metadata` / `get_model_status` functions as gRPC.
- `--enable-batching`: concurrent requests merged into one session run
  (`serving.batching`), as TF Serving's `--enable_batching`.

Binds 127.0.0.1 unless --host says otherwise; SIGTERM stops it cleanly.
"""

import concurrent.futures
import contextlib
import copy
import dataclasses
import logging
import os
import signal
import socket
import threading
import time

import grpc
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
    predict_pb2,
)
from tensorflow_serving.config import file_system_storage_path_source_pb2, model_server_config_pb2

from patchnet_tf.flag_types import (
    message_bytes, nonnegative_float, nonnegative_int, port_number, positive_float, positive_int,
)
from patchnet_tf.errors import PatchNetError
from serving.batching import BatchingOptions, BatchScheduler, read_batching_parameters
from serving.loader import DEFAULT_SIGNATURE, WARMUP_PATH, LoadedModel, SignatureError, first_line
from serving.memory import returns_memory
from serving.warmup import replay_warmup

LOG = logging.getLogger("patchnet.serve")
DEFAULT_PORT = 8500
MAX_MESSAGE_BYTES = 2**31 - 1  # INT32_MAX: TF Serving sets no smaller cap (model_servers/server.cc)


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


class ConfigError(PatchNetError):
    """A ModelServerConfig TF Serving would refuse; `code` is the gRPC status name it answers with."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def latest_policy(num_versions=1):
    """TF Serving's default version policy, `latest { num_versions: N }`."""
    policy = file_system_storage_path_source_pb2.FileSystemStoragePathSourceConfig.ServableVersionPolicy()
    policy.latest.num_versions = num_versions
    return policy


def aspired_versions(policy, on_disk):
    """The versions a ServableVersionPolicy asks for among `on_disk` (sorted), as
    sources/storage_path/file_system_storage_path_source.cc picks them."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return set(on_disk)
    if choice == "specific":  # the listed versions that exist; the others are waited for
        return set(policy.specific.versions) & set(on_disk)
    return set(on_disk[-max(policy.latest.num_versions, 1):])  # unset is latest 1


def policy_text(policy):
    return text_format.MessageToString(policy, as_one_line=True) or "latest { num_versions: 1 }"


class ModelManager:
    """Loads and unloads the versions of one model by polling its base folder, as TF Serving's
    default AvailabilityPreservingPolicy does (core/availability_preserving_policy.cc):

    - the versions on disk that the version policy names are aspired; the highest new one loads first;
    - a version no longer aspired is unloaded only when no version is aspired, an aspired one is
      serving, or another unaspired one still serves, so one broken push never empties the server;
    - a failed load is retried `max_load_retries` times, `load_retry_interval` seconds apart
      (--max_num_load_retries, --load_retry_interval_micros), then reported (GetModelStatus: END
      with the error) and left until the folder goes away;
    - an unloaded version's session closes once the last request holding it has finished.
    """

    def __init__(self, base_dir, model_name, *, version_policy=None, poll_seconds=1.0, max_load_retries=5,
                 load_retry_interval=60.0):
        self.base_dir = os.path.abspath(base_dir)
        self.model_name = model_name
        self.version_policy = version_policy if version_policy is not None else latest_policy()
        self.poll_seconds = poll_seconds
        self.max_load_retries = max_load_retries
        self.load_retry_interval = max(0.0, load_retry_interval)
        self._loaded = {}  # version -> LoadedModel
        self._failures = {}  # version -> LoadFailure
        self._unloaded = set()  # versions served before: GetModelStatus END, as TF Serving's state monitor keeps them
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
        aspired = aspired_versions(self.version_policy, on_disk)
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
                unloaded = self._loaded.pop(unaspired[0])
                self._unloaded.add(unaspired[0])
            unloaded.retire()  # closes once no request holds it
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
            self._unloaded.discard(version)
            self._loaded[version] = loaded
        LOG.info("model %s version %d loaded from %s", self.model_name, version, path)

    def start(self):
        self.poll()
        self._thread = threading.Thread(target=self._poll_loop, name=f"version-poller-{self.model_name}",
                                        daemon=True)
        self._thread.start()

    def _poll_loop(self):
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception:
                LOG.exception("polling %s failed", self.base_dir)

    def stop(self):
        """Stops polling and unloads every version (each closes once no request holds it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            loaded, self._loaded = self._loaded, {}
            self._unloaded |= set(loaded)
        for model in loaded.values():
            model.retire()

    def versions(self):
        with self._lock:
            return sorted(self._loaded)

    def statuses(self):
        """{version: (state name, LoadFailure or None)} as GetModelStatus reports them."""
        with self._lock:
            states = {version: ("AVAILABLE", None) for version in self._loaded}
            for version, failure in self._failures.items():
                states.setdefault(version, ("END" if failure.gave_up else "LOADING", failure))
            for version in self._unloaded:
                states.setdefault(version, ("END", None))
        return states

    def acquire(self, version=None):
        """(version, LoadedModel) held for a request (release it with .release()), or None if not loaded.

        `version` None is the latest loaded one (TF Serving's ServableRequest::Latest)."""
        with self._lock:
            if version is None and self._loaded:
                version = max(self._loaded)
            model = self._loaded.get(version)
            if model is None:
                return None
            model.acquire()  # under the lock: an unload cannot close it between the look-up and the hold
            return version, model


class ServerCore:
    """The models one server serves, as TF Serving's ServerCore (model_servers/server_core.cc):
    a ModelServerConfig's model_config_list, each model with its version policy and version labels,
    replaced as a whole by `reload_config` (--model_config_file polling, HandleReloadConfigRequest).

    Requests resolve a ModelSpec with `get` (a look-up) or `hold` (a look-up that keeps the
    version's session open until the request is done).
    """

    def __init__(self, *, poll_seconds=1.0, max_load_retries=5, load_retry_interval=60.0,
                 allow_version_labels_for_unavailable_models=False, models_dir=None):
        self.poll_seconds = poll_seconds
        self.max_load_retries = max_load_retries
        self.load_retry_interval = load_retry_interval
        self.allow_version_labels_for_unavailable_models = allow_version_labels_for_unavailable_models
        self.models_dir = os.path.abspath(models_dir) if models_dir else None
        self.config = model_server_config_pb2.ModelServerConfig()
        self._managers = {}  # model name -> ModelManager
        self._labels = {}  # model name -> {label: version}
        self._removed = {}  # model name -> its last statuses, all END (GetModelStatus still answers them)
        self._lock = threading.Lock()  # guards the two maps (swapped whole by a reload)
        self._reload_lock = threading.Lock()  # one reload at a time

    def base_path(self, model_config):
        """Where the model's versions are on this machine: /models/NAME is MODELS_DIR/NAME when
        --models-dir is given (serving/docker-compose.yml mounts that folder at /models)."""
        path = model_config.base_path
        if self.models_dir and (path == "/models" or path.startswith("/models/")):
            return os.path.join(self.models_dir, path[len("/models"):].lstrip("/"))
        return path

    def reload_config(self, config):
        """Applies a ModelServerConfig as ServerCore::ReloadConfig does; raises ConfigError, which
        leaves the models and labels served before untouched."""
        with self._reload_lock:
            choice = config.WhichOneof("config")
            if choice is None:
                LOG.info("Taking no action for empty config.")
                return
            if choice != "model_config_list":
                raise ConfigError("INVALID_ARGUMENT", "ServerModelConfig type not supported: "
                                  "only ModelConfigList is currently supported")
            entries = list(config.model_config_list.config)
            self._validate(entries)
            labels = self._label_map(entries)
            with self._lock:
                old = dict(self._managers)
            managers = {entry.name: self._apply(entry, old.get(entry.name)) for entry in entries}
            with self._lock:
                self._managers, self._labels = managers, labels
                self.config = copy.deepcopy(config)
            for name, manager in old.items():
                if managers.get(name) is not manager:
                    LOG.info("model %s: no longer in the config, unloading", name)
                    manager.stop()
                    with self._lock:
                        self._removed[name] = {version: ("END", failure)
                                               for version, (_, failure) in manager.statuses().items()}

    def _apply(self, entry, manager):
        """The ModelManager serving a ModelConfig: `manager` with the entry's policy, or a new one."""
        base_dir = os.path.abspath(self.base_path(entry))
        policy = copy.deepcopy(entry.model_version_policy)
        if manager is not None and manager.base_dir == base_dir:
            if manager.version_policy != policy:
                LOG.info("model %s: version policy now %s", entry.name, policy_text(policy))
                manager.version_policy = policy
                manager.poll()
            return manager
        # New (or moved): its versions load before it takes requests, as TF Serving waits for new models.
        manager = ModelManager(base_dir, entry.name, version_policy=policy, poll_seconds=self.poll_seconds,
                               max_load_retries=self.max_load_retries, load_retry_interval=self.load_retry_interval)
        LOG.info("model %s: serving %s (%s)", entry.name, base_dir, policy_text(policy))
        manager.start()
        return manager

    def _validate(self, entries):
        """ValidateModelConfigList and GetPlatform's checks, with their messages."""
        names = set()
        for entry in entries:
            if entry.name in names:
                raise ConfigError("INVALID_ARGUMENT",
                                  f"Illegal to list model {entry.name} multiple times in config list")
            names.add(entry.name)
            if not entry.name:
                raise ConfigError("INVALID_ARGUMENT", "a model in the config list has no name")
            if not os.path.isabs(entry.base_path):
                raise ConfigError("INVALID_ARGUMENT", f"Expected model {entry.name} to have an absolute path or URI; "
                                  f"got base_path()={entry.base_path}")
            platform = entry.model_platform or ("tensorflow" if entry.model_type == 1 else "")
            if not platform:
                raise ConfigError("INVALID_ARGUMENT", "Illegal setting neither ModelServerConfig::model_type "
                                  f"(deprecated) nor ModelServerConfig::model_platform, model name is {entry.name}")
            if platform != "tensorflow":
                raise ConfigError("INVALID_ARGUMENT", f"Model {entry.name} requests unsupported platform {platform}")

    def _label_map(self, entries):
        """UpdateModelVersionLabelMap: a label may point only at a version that is AVAILABLE now, unless
        --allow_version_labels_for_unavailable_models, and then only a label not already on another version
        (so a label is never moved onto a version still loading)."""
        labels = {}
        for entry in entries:
            with self._lock:
                manager = self._managers.get(entry.name)
                current = self._labels.get(entry.name, {})
            statuses = manager.statuses() if manager is not None else {}
            for label, version in sorted(entry.version_labels.items()):  # the first bad one, always the same
                available = statuses.get(version, (None,))[0] == "AVAILABLE"
                allowed = self.allow_version_labels_for_unavailable_models and current.get(label, version) == version
                if not (available or allowed):
                    raise ConfigError("FAILED_PRECONDITION", f"Request to assign label to version {version} of model "
                                      f"{entry.name}, which is not currently available for inference")
                labels.setdefault(entry.name, {})[label] = version
        return labels

    def model_names(self):
        with self._lock:
            return sorted(self._managers)

    def manager(self, model_name):
        """The ModelManager of a served model, or None."""
        with self._lock:
            return self._managers.get(model_name)

    def labels(self, model_name):
        with self._lock:
            return dict(self._labels.get(model_name, {}))

    def versions(self, model_name):
        manager = self.manager(model_name)
        return manager.versions() if manager is not None else []

    def statuses(self, model_name):
        """{version: (state name, LoadFailure or None)}; a model removed from the config: END for each
        version it had; {} for a model never served."""
        with self._lock:
            manager = self._managers.get(model_name)
            removed = dict(self._removed.get(model_name, {}))
        return manager.statuses() if manager is not None else removed

    def _resolve(self, model_spec):
        """(model name, requested version or None) as ServableRequestFromModelSpec; raises SignatureError."""
        name = model_spec.name
        if not name:
            raise SignatureError("INVALID_ARGUMENT", "ModelSpec has no name specified.")
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version":
            return name, model_spec.version.value
        if choice == "version_label":
            with self._lock:
                version = self._labels.get(name, {}).get(model_spec.version_label)
            if version is None:
                raise SignatureError("INVALID_ARGUMENT",
                                     f"Unrecognized servable version label: {model_spec.version_label}")
            return name, version
        return name, None

    def _acquire(self, model_spec):
        name, requested = self._resolve(model_spec)
        manager = self.manager(name)
        found = manager.acquire(requested) if manager is not None else None
        if found is None:
            request_text = f"Latest({name})" if requested is None else f"Specific({name}, {requested})"
            raise SignatureError("NOT_FOUND", f"Servable not found for request: {request_text}")
        return found

    def get(self, model_spec):
        """(version, LoadedModel) for a ModelSpec; raises SignatureError with TF Serving's codes.

        A look-up only: use `hold` to run the model, so that an unload cannot close it mid-request."""
        version, model = self._acquire(model_spec)
        model.release()
        return version, model

    @contextlib.contextmanager
    def hold(self, model_spec):
        """`with core.hold(spec) as (version, model):` the session stays open until the block ends."""
        version, model = self._acquire(model_spec)
        try:
            yield version, model
        finally:
            model.release()

    def poll(self):
        """One version poll of every model (tests; the pollers run on their own)."""
        with self._lock:
            managers = list(self._managers.values())
        for manager in managers:
            manager.poll()

    def stop(self):
        with self._lock:
            managers, self._managers, self._labels = self._managers, {}, {}
        for manager in managers.values():
            manager.stop()


def read_model_config(path):
    """A ModelServerConfig from its text format (TF Serving's --model_config_file); raises ConfigError."""
    try:
        with open(path) as file:
            text = file.read()
    except OSError as error:
        raise ConfigError("INVALID_ARGUMENT", f"{path}: cannot read ({error.strerror})") from None
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ConfigError("INVALID_ARGUMENT", f"{path}: not a ModelServerConfig: {error}") from None
    return config


def single_model_config(base_dir, model_name, num_versions=1):
    """TF Serving's BuildSingleModelConfig (--model_base_path, --model_name), latest N versions."""
    config = model_server_config_pb2.ModelServerConfig()
    entry = config.model_config_list.config.add()
    entry.name = model_name
    entry.base_path = os.path.abspath(base_dir)
    entry.model_platform = "tensorflow"
    entry.model_version_policy.CopyFrom(latest_policy(num_versions))
    return config


def _abort(context, code, message):
    context.abort(getattr(grpc.StatusCode, code), message)


def _status_name(error):
    """The gRPC status name of a TF OpError (their codes are the same numbers)."""
    for code in grpc.StatusCode:
        if code.value[0] == error.error_code:
            return code.name
    return "INTERNAL"


@returns_memory
def predict(core, request, run=None):
    """PredictionService.Predict for both front ends (gRPC and REST), so their codes and messages are one.

    `run(model, signature_name, inputs, output_filter)` runs the signature (default: LoadedModel.run; the
    batching scheduler's `run` with --enable_batching). The version is held while it runs, so an unload
    never closes its session mid-request. Returns a PredictResponse; raises SignatureError with TF
    Serving's status code.
    """
    if not request.HasField("model_spec"):
        raise SignatureError("INVALID_ARGUMENT", "Missing ModelSpec")
    with core.hold(request.model_spec) as (version, model):
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


def get_model_metadata(core, request):
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
    version, model = core.get(request.model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in model.signatures.items():
        signature_map.signature_def[name].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = version
    response.metadata["signature_def"].Pack(signature_map)
    return response


def get_model_status(core, request):
    """ModelService.GetModelStatus for both front ends; raises SignatureError.

    As get_model_status_impl.cc: a version_label is not looked at; without a version, every version.
    """
    if not request.HasField("model_spec"):
        raise SignatureError("INVALID_ARGUMENT", "Missing ModelSpec")
    spec = request.model_spec
    requested = spec.version.value if spec.HasField("version") else None
    statuses = core.statuses(spec.name)
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
    def __init__(self, core, run=None):
        self.core = core
        self.run = run

    def Predict(self, request, context):
        try:
            return predict(self.core, request, self.run)
        except SignatureError as error:
            return _abort(context, error.code, error.message)

    def GetModelMetadata(self, request, context):
        try:
            return get_model_metadata(self.core, request)
        except SignatureError as error:
            return _abort(context, error.code, error.message)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core):
        self.core = core

    def GetModelStatus(self, request, context):
        try:
            return get_model_status(self.core, request)
        except SignatureError as error:
            return _abort(context, error.code, error.message)

    def HandleReloadConfigRequest(self, request, context):
        """As model_service_impl.cc: only a model_config_list; the whole config replaces the served one."""
        if request.config.WhichOneof("config") != "model_config_list":
            return _abort(context, "INVALID_ARGUMENT",
                          "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                          "Only ModelConfigList is currently supported")
        try:
            self.core.reload_config(request.config)
        except ConfigError as error:
            LOG.error("ReloadConfig failed: %s", error.message)
            return _abort(context, error.code, error.message)
        return model_management_pb2.ReloadConfigResponse()


class ConfigFilePoller:
    """Re-reads --model_config_file every `seconds` and applies it when it changed, as TF Serving's
    PollFilesystemAndReloadConfig: an unreadable or refused file is logged and the served config stays."""

    def __init__(self, core, path, seconds):
        self.core, self.path, self.seconds = core, path, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="config-poller", daemon=True)

    def start(self):
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(self.seconds):
            self.poll()

    def poll(self):
        try:
            config = read_model_config(self.path)
        except ConfigError as error:
            LOG.error("Failed to read ModelServerConfig file: %s", error.message)
            return
        if config == self.core.config:
            return
        try:
            self.core.reload_config(config)
            LOG.info("reloaded %s: models %s", self.path, ", ".join(self.core.model_names()) or "none")
        except ConfigError as error:
            LOG.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s: %s", self.path, error.message)
        except Exception:  # the server must outlive a bad reload
            LOG.exception("reloading %s failed", self.path)

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


class LocalServer:
    """A running server: `.port`, `.address`, `.rest_port`, `.core`, `.versions()`, `.wait_for_version()`,
    `.stop()`."""

    def __init__(self, core, grpc_server, host, port, config_poller=None, rest=None, batcher=None):
        self.core = core
        self._server = grpc_server
        self._config_poller = config_poller
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.rest = rest  # serving.rest.RestServer or None
        self.rest_port = rest.port if rest else None
        self.rest_url = f"http://{host}:{rest.port}" if rest else None
        self.batcher = batcher  # serving.batching.BatchScheduler or None

    def _name(self, model_name):
        if model_name is not None:
            return model_name
        names = self.core.model_names()
        if len(names) != 1:
            raise ValueError(f"this server serves models {names}: name one")
        return names[0]

    def versions(self, model_name=None):
        """Loaded versions of `model_name` (default: the only model)."""
        return self.core.versions(self._name(model_name))

    def wait_for_version(self, version=None, timeout=60.0, model_name=None):
        """Blocks until `version` (or any version) is loaded; returns the loaded versions."""
        model_name = self._name(model_name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            versions = self.versions(model_name)
            if (version is None and versions) or version in versions:
                return versions
            time.sleep(0.05)
        raise PatchNetError(
            f"model {model_name}: version {version if version is not None else 'any'} not loaded within {timeout} s"
        )

    def stop(self, grace=5.0):
        """Finishes requests in flight (up to `grace` seconds), then unloads everything."""
        if self._config_poller is not None:
            self._config_poller.stop()
        if self.rest is not None:
            self.rest.stop()
        self._server.stop(grace).wait()
        if self.batcher is not None:
            self.batcher.stop()
        self.core.stop()

    def wait(self):
        self._server.wait_for_termination()


def check_port_free(host, port):
    """gRPC prints a native error line of its own before it fails on a busy port or an address that is
    not this machine's: ask the OS first (port 0 too, which checks the address)."""
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind((address, port))
        except OSError as error:
            raise PatchNetError(f"cannot bind {host}:{port} ({error.strerror or error})") from None


def start_server(base_dir=None, model_name=None, host="127.0.0.1", port=0, *, model_config_file=None,
                 model_config_file_poll_wait_seconds=0.0, poll_seconds=1.0, num_versions=1, workers=8,
                 max_load_retries=5, load_retry_interval=60.0, allow_version_labels_for_unavailable_models=False,
                 models_dir=None, max_message_bytes=MAX_MESSAGE_BYTES, rest_api_port=None, batching=None):
    """Starts serving one model (BASE/<version> folders) or the models of a ModelServerConfig file;
    port 0 picks a free port (see `.port`). Raises PatchNetError for a bad base folder or config file.

    rest_api_port: also answer TF Serving's REST API there (None: no REST; 0: any free port).
    batching: a serving.batching.BatchingOptions to merge concurrent requests (--enable_batching).
    """
    if (base_dir is None) == (model_config_file is None):
        raise PatchNetError("give a model base folder or --model-config-file, not both")
    if rest_api_port and rest_api_port == port:  # TF Serving refuses this too (model_servers/server.cc)
        raise PatchNetError(f"--rest-api-port {rest_api_port} must differ from --port")
    if model_config_file is not None:
        model_config_file = os.path.abspath(model_config_file)
        try:
            config = read_model_config(model_config_file)
        except ConfigError as error:
            raise PatchNetError(error.message) from None
    else:
        base_dir = os.path.abspath(base_dir)
        if not os.path.isdir(base_dir):
            raise PatchNetError(f"{base_dir}: no such model base folder (expected BASE/<version>/saved_model.pb)")
        config = single_model_config(base_dir, model_name or os.path.basename(base_dir), num_versions)
    core = ServerCore(poll_seconds=poll_seconds, max_load_retries=max_load_retries,
                      load_retry_interval=load_retry_interval, models_dir=models_dir,
                      allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        options=[  # TF Serving: SetMaxMessageSize(INT32_MAX) (model_servers/server.cc)
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # gRPC's default SO_REUSEPORT let a second server share a port in use, silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    batcher = BatchScheduler(batching) if batching is not None else None
    run = batcher.run if batcher is not None else None
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(core, run), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(core), server)
    rest = None
    try:  # both ports before loading any model: a busy port fails in a second, not after the load
        check_port_free(host, port)
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            bound = 0
        if not bound:
            raise PatchNetError(f"cannot bind {host}:{port} (in use or not a local address)")
        if rest_api_port is not None:
            from serving.rest import RestServer  # the REST front end calls back into this module

            rest = RestServer(core, host, rest_api_port, run=run)
        core.reload_config(config)
    except (PatchNetError, ConfigError) as error:
        server.stop(0)
        for part in (rest, batcher, core):
            if part is not None:
                part.stop()
        if not isinstance(error, ConfigError):
            raise
        # As TF Serving: "Failed to start server"
        raise PatchNetError(f"{model_config_file or base_dir}: {error.code}: {error.message}") from None
    poller = None
    if model_config_file is not None and model_config_file_poll_wait_seconds > 0:
        poller = ConfigFilePoller(core, model_config_file, model_config_file_poll_wait_seconds)
        poller.start()
    server.start()
    if rest is not None:
        rest.start()
    return LocalServer(core, server, host, bound, poller, rest, batcher)


def add_arguments(parser):
    parser.add_argument("base", nargs="?", default=None,
                        help="model base folder holding <version>/saved_model.pb (or use --model-config-file)")
    parser.add_argument("--model-name", default=None, help="default: the base folder's name")
    parser.add_argument("--model-config-file", default=None,
                        help="serve the models of this ModelServerConfig text file (the models.config "
                        "`patchnet push` writes) instead of BASE (TF Serving's --model_config_file)")
    parser.add_argument("--model-config-file-poll-wait-seconds", type=nonnegative_float, default=0.0,
                        help="re-read --model-config-file this often and apply changes; 0: read once "
                        "(TF Serving's flag)")
    parser.add_argument("--models-dir", default=None,
                        help="the local folder that base paths under /models/ in --model-config-file stand "
                        "for (serving/docker-compose.yml mounts it at /models); default: the config file's folder")
    parser.add_argument("--allow-version-labels-for-unavailable-models", action="store_true",
                        help="let the config assign a new label to a version not loaded yet (TF Serving's flag)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="gRPC port (0: any free port)")
    parser.add_argument("--poll-seconds", type=positive_float, default=1.0,
                        help="how often to look for new versions (TF Serving: --file_system_poll_wait_seconds)")
    parser.add_argument("--num-versions", type=positive_int, default=1,
                        help="with BASE: serve the latest N versions (TF Serving's default policy is latest 1)")
    parser.add_argument("--workers", type=positive_int, default=8, help="concurrent requests")
    parser.add_argument("--max-num-load-retries", type=nonnegative_int, default=5,
                        help="retries of a failed version load before giving up (TF Serving's flag)")
    parser.add_argument("--load-retry-interval-micros", type=int, default=60_000_000,
                        help="microseconds between load retries; negative: no wait (TF Serving's flag)")
    parser.add_argument("--max-message-bytes", type=message_bytes, default=MAX_MESSAGE_BYTES,
                        help="largest request or response in bytes (default 2147483647, INT32_MAX, as TF Serving)")
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
    if (args.base is None) == (args.model_config_file is None):
        raise PatchNetError("give a model base folder BASE or --model-config-file FILE (one of the two)")
    if args.batching_parameters_file and not args.enable_batching:
        raise PatchNetError("--batching-parameters-file is used only with --enable-batching")
    batching = None
    if args.enable_batching:
        batching = (read_batching_parameters(args.batching_parameters_file) if args.batching_parameters_file
                    else BatchingOptions())
    models_dir = args.models_dir
    if args.model_config_file is not None and models_dir is None:
        models_dir = os.path.dirname(os.path.abspath(args.model_config_file))
    server = start_server(args.base, args.model_name, args.host, args.port,
                          model_config_file=args.model_config_file,
                          model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
                          poll_seconds=args.poll_seconds, num_versions=args.num_versions,
                          workers=args.workers, max_load_retries=args.max_num_load_retries,
                          load_retry_interval=args.load_retry_interval_micros / 1e6,
                          allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
                          models_dir=models_dir, max_message_bytes=args.max_message_bytes,
                          rest_api_port=args.rest_api_port or None, batching=batching)
    stopped = threading.Event()

    def on_signal(signum, frame):
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    served = []
    for name in server.core.model_names():
        versions = server.core.versions(name)
        served.append(f"model {name} from {server.core.manager(name).base_dir} "
                      f"(versions: {', '.join(map(str, versions)) or 'none yet, polling'})")
    print(f"serving {'; '.join(served) or 'no models'} on {server.address}"
          + (f"; REST API on {server.rest_url}" if server.rest_url else "")
          + ("; batching on" if server.batcher else ""), flush=True)
    while not stopped.wait(0.5):
        pass
    print("stopping: finishing requests in flight", flush=True)
    server.stop()
    print("stopped", flush=True)
