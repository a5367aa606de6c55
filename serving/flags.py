"""The flags of `patchnet serve` and `patchnet predict`, declared without TensorFlow.

`patchnet_launcher` builds the parser from `add_<command>_arguments` here and
parses the command line before serving/server.py or serving/client.py (which
import TensorFlow) is imported: --help and a bad flag answer at once.
"""

from patchnet_launcher import (
    host_port,
    message_bytes,
    nonnegative_float,
    nonnegative_int,
    port_number,
    positive_float,
    positive_int,
)

DEFAULT_PORT = 8500
MAX_MESSAGE_BYTES = 2**31 - 1  # INT32_MAX: TF Serving sets no smaller cap (model_servers/server.cc)
SIGNATURES = ("classify", "heatmap")  # what `patchnet predict` asks for
DEFAULT_WAIT = 120.0  # seconds for a server to come up: the paper's model loads and warms up in about 55
DEFAULT_DEADLINE = 300.0  # seconds per request: two 128 x 128 heatmaps of the paper's model take over 30


def add_serve_arguments(parser):
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
                        help="largest request or response in bytes, gRPC and REST bodies alike (default 2147483647, "
                             "INT32_MAX, as TF Serving)")
    parser.add_argument("--rest-api-port", type=port_number, default=0,
                        help="also serve TF Serving's REST API on this port; 0 (default): no REST, as "
                             "tensorflow_model_server (its Docker image passes 8501)")
    parser.add_argument("--monitoring-config-file", default=None,
                        help="TF Serving's MonitoringConfig text file; with prometheus_config { enable: true } the "
                             "REST port serves Prometheus metrics at its path (default /monitoring/prometheus/metrics)")
    parser.add_argument("--enable-batching", action="store_true",
                        help="merge concurrent requests into one session run (TF Serving's --enable_batching)")
    parser.add_argument("--batching-parameters-file", default=None,
                        help="text-format BatchingParameters, e.g. serving/batching.config "
                             "(default: TF Serving's defaults)")


def add_predict_arguments(parser):
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, BMP), sent as encoded bytes")
    parser.add_argument("--server", type=host_port, default="localhost:8500", help="host:port of the gRPC endpoint")
    parser.add_argument("--model", required=True, help="model name (models.config name)")
    parser.add_argument("--version", type=positive_int, default=None, help="default: the latest served")
    parser.add_argument("--signature", choices=SIGNATURES, default="classify",
                        help="classify: probability and label; heatmap: also writes the heatmap PNGs")
    parser.add_argument("--deadline", type=positive_float, default=DEFAULT_DEADLINE, help="seconds per request")
    parser.add_argument("--wait", type=positive_float, default=DEFAULT_WAIT,
                        help="seconds to wait for a server that is still starting (loading its models)")
    parser.add_argument("--retries", type=nonnegative_int, default=4, help="retries on UNAVAILABLE, with backoff")
    parser.add_argument("--out", default="heatmaps", help="folder for heatmap PNGs (heatmap signature)")
