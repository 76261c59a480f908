"""okd's logger (``logging.getLogger("okd")``), shared by the run store, the trainer and the commands."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("okd")


def setup_logging() -> None:
    """Log okd's messages to stderr with the time, once per process."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
