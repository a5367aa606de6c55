"""`patchnet serve`: a local gRPC server that answers like TensorFlow Serving.

For where `tensorflow_model_server` cannot run (development, tests, the
demo). It implements PredictionService (Predict, Classify, Regress,
GetModelMetadata) and ModelService (GetModelStatus, HandleReloadConfigRequest) with the
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
- Status codes and messages as TF Serving's (model_servers/, servables/tensorflow/); no message
  size cap below TF Serving's INT32_MAX unless --max-message-bytes says so.
- `--rest-api-port`: TF Serving's REST API as well (`serving.rest`); both front ends call
  the same handlers (`serving.handlers`). The models themselves are `serving.core`'s.
- `--enable-batching`: concurrent requests merged into one session run
  (`serving.batching`), as TF Serving's `--enable_batching`.
- `--monitoring-config-file`: Prometheus metrics on the REST port (`serving.metrics`).

Binds 127.0.0.1 unless --host says otherwise; SIGTERM stops it cleanly.
"""

import concurrent.futures
import logging
import os
import signal
import socket
import threading
import time

import grpc
from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc

from patchnet_tf.errors import PatchNetError
from serving import handlers
from serving.batching import BatchingOptions, BatchScheduler, read_batching_parameters
from serving.core import ConfigFilePoller, ServerCore, read_model_config, single_model_config
from serving.errors import ServingError
from serving.flags import MAX_MESSAGE_BYTES
from serving.metrics import METRICS, read_monitoring_config
from serving.rest import RestServer

LOG = logging.getLogger("patchnet.serve")


def _answer(context, handler, *args, api=None):
    """The handler's response, or the call aborted with its ServingError's code and message. Calls with an
    `api` name are counted and timed (`args[1]` is the request), as prediction_service_impl.cc does."""
    start = time.perf_counter()
    code = "OK"
    try:
        return handler(*args)
    except ServingError as error:
        code = error.code
        context.abort(getattr(grpc.StatusCode, error.code), error.message)
    except Exception:
        code = "INTERNAL"
        raise
    finally:
        if api is not None:
            METRICS.request(args[1].model_spec.name, api, "GRPC", code, time.perf_counter() - start)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core, run=None):
        self.core = core
        self.run = run

    def Predict(self, request, context):
        return _answer(context, handlers.predict, self.core, request, self.run, api="Predict")

    def Classify(self, request, context):
        return _answer(context, handlers.classify, self.core, request, api="Classify")

    def Regress(self, request, context):
        return _answer(context, handlers.regress, self.core, request, api="Regress")

    def GetModelMetadata(self, request, context):
        return _answer(context, handlers.get_model_metadata, self.core, request)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core):
        self.core = core

    def GetModelStatus(self, request, context):
        return _answer(context, handlers.get_model_status, self.core, request)

    def HandleReloadConfigRequest(self, request, context):
        return _answer(context, reload_config, self.core, request)


def reload_config(core, request):
    """As model_service_impl.cc: only a model_config_list; the whole config replaces the served one."""
    if request.config.WhichOneof("config") != "model_config_list":
        raise ServingError("INVALID_ARGUMENT", "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                                               "Only ModelConfigList is currently supported")
    try:
        core.reload_config(request.config)
    except ServingError as error:
        LOG.error("ReloadConfig failed: %s", error.message)
        raise
    return model_management_pb2.ReloadConfigResponse()


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
            METRICS.forget_batcher(self.batcher)
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
                 models_dir=None, max_message_bytes=MAX_MESSAGE_BYTES, rest_api_port=None, batching=None,
                 monitoring_config_file=None):
    """Starts serving one model (BASE/<version> folders) or the models of a ModelServerConfig file;
    port 0 picks a free port (see `.port`). Raises PatchNetError for a bad base folder or config file.

    rest_api_port: also answer TF Serving's REST API there (None: no REST; 0: any free port).
    batching: a serving.batching.BatchingOptions to merge concurrent requests (--enable_batching).
    monitoring_config_file: a MonitoringConfig text file; with prometheus_config enabled, the REST port
    answers its path with the metrics (serving.metrics).
    """
    if (base_dir is None) == (model_config_file is None):
        raise PatchNetError("give a model base folder or --model-config-file, not both")
    metrics_path = read_monitoring_config(monitoring_config_file) if monitoring_config_file else None
    if monitoring_config_file and rest_api_port is None:  # TF Serving ignores the file then; say so instead
        raise PatchNetError("--monitoring-config-file: the metrics are served on the REST port: give --rest-api-port")
    if rest_api_port and rest_api_port == port:  # TF Serving refuses this too (model_servers/server.cc)
        raise PatchNetError(f"--rest-api-port {rest_api_port} must differ from --port")
    if model_config_file is not None:
        model_config_file = os.path.abspath(model_config_file)
        try:
            config = read_model_config(model_config_file)
        except ServingError as error:
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
            rest = RestServer(core, host, rest_api_port, run=run, max_body_bytes=max_message_bytes,
                              metrics_path=metrics_path)
        core.reload_config(config)
    except PatchNetError as error:
        server.stop(0)
        for part in (rest, batcher, core):
            if part is not None:
                part.stop()
        if not isinstance(error, ServingError):
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
    if batcher is not None:
        METRICS.watch_batcher(batcher)
    return LocalServer(core, server, host, bound, poller, rest, batcher)


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
                          rest_api_port=args.rest_api_port or None, batching=batching,
                          monitoring_config_file=args.monitoring_config_file)
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
          + ("; batching on" if server.batcher else "")
          + (f"; metrics on {server.rest_url}{server.rest.metrics_path}" if server.rest and server.rest.metrics_path
             else ""), flush=True)
    while not stopped.wait(0.5):
        pass
    print("stopping: finishing requests in flight", flush=True)
    server.stop()
    print("stopped", flush=True)
