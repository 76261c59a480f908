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


class RunFolderError(OKDError):
    """A run folder that cannot be written: held by another writer, not a writable folder, or the disk is full."""


class NonFiniteError(OKDError):
    """Training diverged (a non-finite loss or weight); nothing of the diverged epoch was saved."""


class StopRequested(KeyboardInterrupt):
    """SIGTERM (or SIGINT) asked the run to stop; ``signum`` gives the CLI its exit status (128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
