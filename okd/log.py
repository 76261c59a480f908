"""okd's logger (``logging.getLogger("okd")``), shared by the run store, the trainer and the commands."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("okd")


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted (not as it was when logging was set up), so a
    replaced or redirected stderr (a test's capture, a child process's log file) never leaves a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the stream is always the current sys.stderr
        pass


def setup_logging() -> None:
    """Log okd's messages to stderr with the time, once per process."""
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
