"""User-facing errors: the CLI prints their message as one paragraph and exits non-zero."""


class OKDError(Exception):
    """An error caused by the user's input (config, data, checkpoint), with a message that says how to fix it."""


class ConfigError(OKDError):
    """A bad config key or value."""


class DataError(OKDError):
    """A missing, corrupt or malformed dataset."""


class CheckpointError(OKDError):
    """A missing, corrupt or mismatched checkpoint or run folder."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds pickled objects (possible code), refused by ``weights_only=True`` loading."""
