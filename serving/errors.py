"""The one error type of the serving side: what TF Serving would refuse, with its gRPC status code."""

from patchnet_tf.errors import PatchNetError


class ServingError(PatchNetError):
    """A request (or a model config) TF Serving refuses; `code` is the gRPC status name it answers with
    ("INVALID_ARGUMENT", "NOT_FOUND", ...), `message` its text. gRPC aborts with them; REST answers
    `{"error": message}` with the HTTP status TF Serving maps the code to."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message
