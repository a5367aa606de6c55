"""Prometheus metrics under TF Serving's names, on prometheus_client.

`--monitoring-config-file` takes TF Serving's MonitoringConfig text proto
(config/monitoring_config.proto):

    prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }

and the REST port then answers that path with Prometheus text. As TF Serving (util/prometheus_exporter.cc)
a metric "/tensorflow/serving/request_count" is exported as ":tensorflow:serving:request_count":

- `:tensorflow:serving:request_count{model_name, status}`: requests, by gRPC status name (OK,
  INVALID_ARGUMENT, ...): every REST call, gRPC Predict / Classify / Regress
  (model_servers/http_server.cc, prediction_service_impl.cc);
- `:tensorflow:serving:request_latency{model_name, API, entrypoint}`: histogram of the microseconds of
  successful calls; API "Predict" / "Classify" / "Regress" over gRPC, the URL's method ("predict", ""
  for status and metadata) over REST; entrypoint GRPC or REST (servables/tensorflow/util.cc's buckets);
- `:tensorflow:cc:saved_model:load_attempt_count{model_path, status}` ("success" / "fail") and
  `:tensorflow:cc:saved_model:load_latency{model_path}` (microseconds of successful loads, summed), as
  TensorFlow's SavedModel loader counts them (tensorflow/cc/saved_model/loader.cc);
- `:tensorflow:serving:batching_session:wrapped_run_count`: session runs of merged batches, with
  --enable-batching, and `:tensorflow:serving:batching_session:queuing_latency{thread_pool_name}`:
  histogram of the microseconds each request waited in the queue (batching/batching_session.cc,
  its buckets); and, under names of our own as TF Serving has none,
  the queue depth: `patchnet_batching_enqueued_batches`, `patchnet_batching_enqueued_requests` (gauges).

TF Serving writes its counters as `# TYPE name counter` with the bare name; prometheus_client's text
writer renames every counter to `name_total`, so these are written as untyped under TF Serving's exact
names (Prometheus ingests them alike; rate() works on them).

The metrics are process-wide, as TF Serving's are (`METRICS`).
"""

import threading

import prometheus_client
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from prometheus_client.core import Metric

from serving.text_proto import read_text_proto

prometheus_client.disable_created_metrics()  # TF Serving exports no *_created series
DEFAULT_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath
# servables/tensorflow/util.cc: Buckets::Exponential(10, 1.8, 33): 32 finite limits, then +Inf
LATENCY_BUCKETS_MICROS = [10 * 1.8**index for index in range(32)]
# batching/batching_session.cc: Buckets::Exponential(100, 1.2, 52)
QUEUING_BUCKETS_MICROS = [100 * 1.2**index for index in range(51)]


def _monitoring_config_class():
    """tensorflow.serving.MonitoringConfig as config/monitoring_config.proto declares it (tensorflow-serving-api
    does not ship it), for protobuf's own text-format parser."""
    file = descriptor_pb2.FileDescriptorProto(name="patchnet/monitoring_config.proto", package="tensorflow.serving",
                                              syntax="proto3")
    field = descriptor_pb2.FieldDescriptorProto
    prometheus = file.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    monitoring = file.message_type.add(name="MonitoringConfig")
    monitoring.field.add(name="prometheus_config", number=1, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                         type_name=".tensorflow.serving.PrometheusConfig")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


MonitoringConfig = _monitoring_config_class()


def read_monitoring_config(path):
    """The Prometheus path a MonitoringConfig file enables, or None; raises PatchNetError naming the file."""
    config = read_text_proto(path, MonitoringConfig)
    if not config.prometheus_config.enable:
        return None
    return config.prometheus_config.path or DEFAULT_PATH


class Metrics:
    """The counters and histograms, and their Prometheus text (`text()`)."""

    def __init__(self):
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._counters = {  # name -> (help, label names, {label values: value})
            ":tensorflow:serving:request_count": ("The total number of requests.", ("model_name", "status"), {}),
            ":tensorflow:cc:saved_model:load_attempt_count": (
                "The number of times a SavedModel was successfully loaded.", ("model_path", "status"), {}),
            ":tensorflow:cc:saved_model:load_latency": (
                "Latency in microseconds for SavedModels that were successfully loaded.", ("model_path",), {}),
        }
        self._batchers = []  # BatchScheduler-s whose stats() count the merged runs
        self.request_latency = prometheus_client.Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ["model_name", "API", "entrypoint"], buckets=LATENCY_BUCKETS_MICROS, registry=self.registry)
        self.queuing_latency = prometheus_client.Histogram(
            ":tensorflow:serving:batching_session:queuing_latency",
            "Distribution of wall time spent (in microseconds) in queuing",
            ["thread_pool_name"], buckets=QUEUING_BUCKETS_MICROS, registry=self.registry)
        self.registry.register(self)

    def _add(self, name, labels, amount=1):
        with self._lock:
            values = self._counters[name][2]
            values[labels] = values.get(labels, 0) + amount

    def request(self, model_name, api, entrypoint, code, seconds):
        """One answered call: counted by status; its latency only when it succeeded, as TF Serving."""
        if code == "OK":
            self.request_latency.labels(model_name, api, entrypoint).observe(seconds * 1e6)
        self._add(":tensorflow:serving:request_count", (model_name, code))

    def load(self, model_path, succeeded, seconds):
        self._add(":tensorflow:cc:saved_model:load_attempt_count", (model_path, "success" if succeeded else "fail"))
        if succeeded:
            self._add(":tensorflow:cc:saved_model:load_latency", (model_path,), round(seconds * 1e6))

    def watch_batcher(self, batcher):
        with self._lock:
            self._batchers.append(batcher)

    def forget_batcher(self, batcher):
        with self._lock:
            self._batchers = [known for known in self._batchers if known is not batcher]

    def collect(self):
        """prometheus_client's collector protocol: the counters, untyped under their bare names."""
        with self._lock:
            counters = {name: (help_text, labels, dict(values)) for name, (help_text, labels, values)
                        in self._counters.items()}
            batchers = list(self._batchers)
        for name, (help_text, label_names, values) in counters.items():
            family = Metric(name, help_text, "unknown")
            for labels, value in sorted(values.items()):
                family.add_sample(name, dict(zip(label_names, labels)), value)
            yield family
        if batchers:
            stats = [batcher.stats() for batcher in batchers]
            name = ":tensorflow:serving:batching_session:wrapped_run_count"
            family = Metric(name, "Total count of run calls on the wrapped session", "unknown")
            family.add_sample(name, {}, sum(each["batches"] for each in stats))
            yield family
            for key, help_text in (("enqueued_batches", "Batches waiting in the batching queues now."),
                                   ("enqueued_requests", "Requests waiting in the batching queues now.")):
                name = f"patchnet_batching_{key}"  # TF Serving has no such metric: our own name
                family = Metric(name, help_text, "gauge")
                family.add_sample(name, {}, sum(each[key] for each in stats))
                yield family

    def text(self):
        return prometheus_client.generate_latest(self.registry).decode()


METRICS = Metrics()

