"""Server-side batching as TF Serving's `--enable_batching --batching_parameters_file`.

Requests for the same model version and signature that arrive within
`batch_timeout_micros` are merged into one session run of up to
`max_batch_size` rows and the outputs are split back, as TF Serving's
BatchingSession on a SharedBatchScheduler queue does:

- one queue per (version, signature tensors, output filter, input dtypes and
  non-batch dimensions); a batch is open until the next task does not fit,
  or it is full, or its first task waited `batch_timeout_micros`;
- `max_enqueued_batches` counts the batches waiting in a queue (the open one
  included, the ones running excluded); a task that needs a new batch when
  that many wait gets UNAVAILABLE "The batch scheduling queue to which this
  task was submitted is full", the real scheduler's words;
- a task of more rows than `max_batch_size` gets INVALID_ARGUMENT "Task
  size N is larger than maximum input batch size M";
- `num_batch_threads` threads run batches; `allowed_batch_sizes` pads a
  batch up to the next allowed size (the padding rows are dropped again).

Two differences, both to the user's benefit: a request that does not fit
its signature is refused before it joins a batch, and when a merged run
fails inside the graph (an undecodable image, say) each of its requests is
run again alone, so only the request that sent the bad image gets the error.
TF Serving fails every request of that batch.

The settings file is the text-format `tensorflow.serving.BatchingParameters`
(servables/tensorflow/session_bundle_config.proto). tensorflow-serving-api
does not ship that message, so it is declared here with the same field
names and numbers, and parsed with protobuf's own text-format parser.
"""

import collections
import dataclasses
import logging
import os
import threading
import time

import numpy as np
import tensorflow as tf
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

from patchnet_tf.errors import PatchNetError
from serving.errors import ServingError
from serving.metrics import METRICS
from serving.text_proto import read_text_proto

LOG = logging.getLogger("patchnet.batching")
QUEUE_FULL = "The batch scheduling queue to which this task was submitted is full"


def _batching_parameters_class():
    """tensorflow.serving.BatchingParameters, field for field as session_bundle_config.proto declares it."""
    file = descriptor_pb2.FileDescriptorProto(
        name="patchnet/session_bundle_config_batching.proto", package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    message = file.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    wrapped = [("max_batch_size", 1, "Int64Value"), ("batch_timeout_micros", 2, "Int64Value"),
               ("max_enqueued_batches", 3, "Int64Value"), ("num_batch_threads", 4, "Int64Value"),
               ("thread_pool_name", 5, "StringValue"), ("enable_large_batch_splitting", 8, "BoolValue"),
               ("max_execution_batch_size", 9, "Int64Value")]
    for name, number, type_name in wrapped:
        message.field.add(name=name, number=number, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                          type_name=f".google.protobuf.{type_name}")
    message.field.add(name="allowed_batch_sizes", number=6, type=field.TYPE_INT64, label=field.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL,
                      label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


BatchingParameters = _batching_parameters_class()


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """The settings in effect; unset fields take SharedBatchScheduler's defaults, as in TF Serving."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = os.cpu_count() or 1  # port::MaxParallelism()
    thread_pool_name: str = "batch_threads"
    allowed_batch_sizes: tuple = ()

    @classmethod
    def from_proto(cls, params, source="batching parameters"):
        def value(name):
            return getattr(params, name).value if params.HasField(name) else getattr(cls, name)

        options = cls(
            max_batch_size=value("max_batch_size"), batch_timeout_micros=value("batch_timeout_micros"),
            max_enqueued_batches=value("max_enqueued_batches"), num_batch_threads=value("num_batch_threads"),
            thread_pool_name=value("thread_pool_name"), allowed_batch_sizes=tuple(params.allowed_batch_sizes),
        )
        problems = [f"{name} must be at least 1, got {getattr(options, name)}"
                    for name in ("max_batch_size", "max_enqueued_batches", "num_batch_threads")
                    if getattr(options, name) < 1]
        if options.batch_timeout_micros < 0:
            problems.append(f"batch_timeout_micros must be >= 0, got {options.batch_timeout_micros}")
        sizes = list(options.allowed_batch_sizes)
        if sizes and (sizes != sorted(set(sizes)) or sizes[-1] != options.max_batch_size):
            # TF Serving's BatchingSession refuses these the same way.
            problems.append("allowed_batch_sizes must be increasing and end with max_batch_size")
        if params.pad_variable_length_inputs:
            problems.append("pad_variable_length_inputs: true is not supported by the local server "
                            "(requests of different shapes go to separate batches instead)")
        if params.HasField("enable_large_batch_splitting") and params.enable_large_batch_splitting.value:
            problems.append("enable_large_batch_splitting is not supported by the local server")
        if problems:
            raise PatchNetError(f"{source}: {'; '.join(problems)}")
        return options


def read_batching_parameters(path):
    """BatchingOptions from a text-format BatchingParameters file (TF Serving's --batching_parameters_file)."""
    return BatchingOptions.from_proto(read_text_proto(path, BatchingParameters, what="batching parameters"), path)


class _Task:
    def __init__(self, inputs, rows):
        self.inputs = inputs
        self.rows = rows
        self.done = threading.Event()
        self.outputs = None
        self.error = None
        self.enqueued = time.monotonic()


class _Batch:
    def __init__(self, queue):
        self.queue = queue
        self.tasks = []
        self.rows = 0
        self.started = time.monotonic()


class _Queue:
    """The batches waiting for one (model version, signature, output filter, input layout)."""

    def __init__(self, key, model, signature_name, output_filter):
        self.key = key
        self.model = model
        self.signature_name = signature_name
        self.output_filter = output_filter
        self.batches = collections.deque()  # the last one is open while it has room


class BatchScheduler:
    """Merges concurrent `run` calls into batched session runs; see the module docstring."""

    def __init__(self, options):
        self.options = options
        self._queues = {}
        self._condition = threading.Condition()
        self._stopped = False
        self._tasks_per_batch = collections.Counter()  # batches run, by the number of requests merged
        self._threads = [
            threading.Thread(target=self._work, name=f"{options.thread_pool_name}-{index}", daemon=True)
            for index in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, model, signature_name, inputs, output_filter=()):
        """As LoadedModel.run, through the batching queue. Blocks until the batch holding it ran."""
        model.check_inputs(signature_name, inputs)  # a bad request never joins (and fails) a batch
        rows = {value.shape[0] if value.ndim else None for value in inputs.values()}
        if len(rows) != 1 or None in rows:  # nothing to batch along: run it as it is
            return model.run(signature_name, inputs, output_filter)
        rows = rows.pop()
        if rows > self.options.max_batch_size:
            raise ServingError("INVALID_ARGUMENT", f"Task size {rows} is larger than maximum input batch size "
                                                     f"{self.options.max_batch_size}")
        output_filter = tuple(output_filter)
        layout = tuple(sorted((key, value.dtype.str, value.shape[1:]) for key, value in inputs.items()))
        # One queue per TensorSignature (the tensors fed and fetched), as BatchingSession keys them.
        signature = model.signature(signature_name)
        tensors = (tuple(sorted(info.name for info in signature.inputs.values())),
                   tuple(sorted(info.name for info in signature.outputs.values())))
        key = (id(model), tensors, output_filter, layout)
        task = _Task(inputs, rows)
        with self._condition:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue(key, model, signature_name, output_filter)
            if not queue.batches or queue.batches[-1].rows + rows > self.options.max_batch_size:
                if len(queue.batches) >= self.options.max_enqueued_batches:
                    raise ServingError("UNAVAILABLE", QUEUE_FULL)
                queue.batches.append(_Batch(queue))
            batch = queue.batches[-1]
            batch.tasks.append(task)
            batch.rows += rows
            self._condition.notify_all()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    def stats(self):
        """Batches run so far ("batches", "requests" in them, "tasks_per_batch": {requests merged: batches})
        and what waits now ("enqueued_batches", "enqueued_requests")."""
        with self._condition:
            counts = dict(self._tasks_per_batch)
            waiting = [batch for queue in self._queues.values() for batch in queue.batches]
        return {"batches": sum(counts.values()), "requests": sum(n * c for n, c in counts.items()),
                "tasks_per_batch": counts, "enqueued_batches": len(waiting),
                "enqueued_requests": sum(len(batch.tasks) for batch in waiting)}

    def stop(self):
        with self._condition:
            self._stopped = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join()
        for queue in self._queues.values():  # nothing should be left; never leave a caller hanging
            for batch in queue.batches:
                for task in batch.tasks:
                    task.error = ServingError("UNAVAILABLE", "server is stopping")
                    task.done.set()

    def _next_batch(self):
        """The oldest schedulable batch (closed, full, or open past the timeout), or (None, seconds to wait)."""
        now = time.monotonic()
        timeout = self.options.batch_timeout_micros / 1e6
        best, wait = None, None
        for queue in self._queues.values():
            if not queue.batches:
                continue
            first = queue.batches[0]
            due = first.started + timeout
            ready = len(queue.batches) > 1 or first.rows >= self.options.max_batch_size or now >= due
            if ready and (best is None or first.started < best.started):
                best = first
            elif not ready:
                wait = due - now if wait is None else min(wait, due - now)
        return best, wait

    def _work(self):
        while True:
            with self._condition:
                while True:
                    if self._stopped:
                        return
                    batch, wait = self._next_batch()
                    if batch is not None:
                        break
                    self._condition.wait(wait)
                queue = batch.queue
                queue.batches.popleft()
                if not queue.batches:
                    del self._queues[queue.key]
                self._tasks_per_batch[len(batch.tasks)] += 1
            dequeued = time.monotonic()
            for task in batch.tasks:
                METRICS.queuing_latency.labels(self.options.thread_pool_name).observe((dequeued - task.enqueued) * 1e6)
            self._process(batch)

    def _process(self, batch):
        queue, tasks = batch.queue, batch.tasks
        try:
            results = self._run_merged(queue, tasks, batch.rows)
        except tf.errors.OpError as error:
            if len(tasks) == 1:
                results = [error]
            else:  # find the request that broke the batch; the others get their answers
                results = []
                for task in tasks:
                    try:
                        results.append(queue.model.run(queue.signature_name, task.inputs, queue.output_filter))
                    except Exception as task_error:
                        results.append(task_error)
        except Exception as error:
            results = [error] * len(tasks)
        for task, result in zip(tasks, results):
            if isinstance(result, Exception):
                task.error = result
            else:
                task.outputs = result
            task.done.set()

    def _run_merged(self, queue, tasks, rows):
        padded = next((size for size in self.options.allowed_batch_sizes if size >= rows), rows)
        merged = {}
        for key in tasks[0].inputs:
            parts = [task.inputs[key] for task in tasks]
            if padded > rows:  # repeat the first row, as BatchingSession pads
                parts.append(np.repeat(parts[0][:1], padded - rows, axis=0))
            merged[key] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        outputs = queue.model.run(queue.signature_name, merged, queue.output_filter)
        for key, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != padded:
                raise ServingError("INTERNAL", f"batched output {key} has {value.shape[:1]} rows, "
                                                 f"expected {padded}")
        results, offset = [], 0
        for task in tasks:
            results.append({key: value[offset:offset + task.rows] for key, value in outputs.items()})
            offset += task.rows
        return results
