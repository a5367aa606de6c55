"""Reading TF Serving's text-format config files (models.config, monitoring.config)."""

from google.protobuf import text_format

from patchnet_tf.errors import PatchNetError


def read_text_proto(path, message_class, error=PatchNetError, what=None):
    """A `message_class` parsed from the text-format file at `path`, as TF Serving's ParseProtoTextFile;
    an unreadable or unparsable file raises `error(text)`, one line naming the file (and `what` it holds)."""
    try:
        with open(path) as file:
            text = file.read()
    except OSError as problem:
        raise error(f"{path}: cannot read{f' {what}' if what else ''} ({problem.strerror})") from None
    message = message_class()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as problem:
        raise error(f"{path}: not a {message_class.DESCRIPTOR.name}: {problem}") from None
    return message
