"""The models a server serves, as TF Serving's ServerCore and its managers: versions found by polling
the base folders, loaded and unloaded as the availability-preserving policy has them, several models
from a ModelServerConfig with version policies and labels, and the model spec of a request resolved to
a loaded version (`serving.server` runs it behind gRPC, `serving.rest` behind REST).
"""

import contextlib
import copy
import dataclasses
import logging
import os
import threading
import time

import grpc
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.config import file_system_storage_path_source_pb2, model_server_config_pb2

from serving.errors import ServingError
from serving.loader import WARMUP_PATH, LoadedModel, first_line
from serving.metrics import METRICS
from serving.text_proto import read_text_proto
from serving.warmup import replay_warmup

LOG = logging.getLogger("patchnet.serve")


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
    """As TF Serving: a version takes traffic only after its warmup requests (if any) ran. The load is
    counted as TensorFlow's SavedModel loader counts it (load_attempt_count, load_latency)."""
    start = time.perf_counter()
    try:
        loaded = LoadedModel(path)
    except Exception:
        METRICS.load(path, False, time.perf_counter() - start)
        raise
    METRICS.load(path, True, time.perf_counter() - start)
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
            code = status_name(error) if isinstance(error, tf.errors.OpError) else "UNKNOWN"
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
        """Applies a ModelServerConfig as ServerCore::ReloadConfig does; raises ServingError, which
        leaves the models and labels served before untouched."""
        with self._reload_lock:
            choice = config.WhichOneof("config")
            if choice is None:
                LOG.info("Taking no action for empty config.")
                return
            if choice != "model_config_list":
                raise ServingError("INVALID_ARGUMENT", "ServerModelConfig type not supported: "
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
                raise ServingError("INVALID_ARGUMENT",
                                  f"Illegal to list model {entry.name} multiple times in config list")
            names.add(entry.name)
            if not entry.name:
                raise ServingError("INVALID_ARGUMENT", "a model in the config list has no name")
            if not os.path.isabs(entry.base_path):
                raise ServingError("INVALID_ARGUMENT", f"Expected model {entry.name} to have an absolute path or URI; "
                                  f"got base_path()={entry.base_path}")
            platform = entry.model_platform or ("tensorflow" if entry.model_type == 1 else "")
            if not platform:
                raise ServingError("INVALID_ARGUMENT", "Illegal setting neither ModelServerConfig::model_type "
                                  f"(deprecated) nor ModelServerConfig::model_platform, model name is {entry.name}")
            if platform != "tensorflow":
                raise ServingError("INVALID_ARGUMENT", f"Model {entry.name} requests unsupported platform {platform}")

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
                    raise ServingError("FAILED_PRECONDITION", f"Request to assign label to version {version} of model "
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
        """(model name, requested version or None) as ServableRequestFromModelSpec; raises ServingError."""
        name = model_spec.name
        if not name:
            raise ServingError("INVALID_ARGUMENT", "ModelSpec has no name specified.")
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version":
            return name, model_spec.version.value
        if choice == "version_label":
            with self._lock:
                version = self._labels.get(name, {}).get(model_spec.version_label)
            if version is None:
                raise ServingError("INVALID_ARGUMENT",
                                     f"Unrecognized servable version label: {model_spec.version_label}")
            return name, version
        return name, None

    def _acquire(self, model_spec):
        name, requested = self._resolve(model_spec)
        manager = self.manager(name)
        found = manager.acquire(requested) if manager is not None else None
        if found is None:
            request_text = f"Latest({name})" if requested is None else f"Specific({name}, {requested})"
            raise ServingError("NOT_FOUND", f"Servable not found for request: {request_text}")
        return found

    def get(self, model_spec):
        """(version, LoadedModel) for a ModelSpec; raises ServingError with TF Serving's codes.

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
    """A ModelServerConfig from its text format (TF Serving's --model_config_file); raises ServingError."""
    return read_text_proto(path, model_server_config_pb2.ModelServerConfig,
                           lambda message: ServingError("INVALID_ARGUMENT", message))


def single_model_config(base_dir, model_name, num_versions=1):
    """TF Serving's BuildSingleModelConfig (--model_base_path, --model_name), latest N versions."""
    config = model_server_config_pb2.ModelServerConfig()
    entry = config.model_config_list.config.add()
    entry.name = model_name
    entry.base_path = os.path.abspath(base_dir)
    entry.model_platform = "tensorflow"
    entry.model_version_policy.CopyFrom(latest_policy(num_versions))
    return config


def status_name(error):
    """The gRPC status name of a TF OpError (their codes are the same numbers)."""
    for code in grpc.StatusCode:
        if code.value[0] == error.error_code:
            return code.name
    return "INTERNAL"


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
        except ServingError as error:
            LOG.error("Failed to read ModelServerConfig file: %s", error.message)
            return
        if config == self.core.config:
            return
        try:
            self.core.reload_config(config)
            LOG.info("reloaded %s: models %s", self.path, ", ".join(self.core.model_names()) or "none")
        except ServingError as error:
            LOG.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s: %s", self.path, error.message)
        except Exception:  # the server must outlive a bad reload
            LOG.exception("reloading %s failed", self.path)

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
