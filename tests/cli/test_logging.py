"""okd's log lines go to stderr as it is when they are written."""

from __future__ import annotations

import io
import sys

from okd.log import log, setup_logging


def test_log_lines_follow_a_replaced_stderr(monkeypatch):
    """A stderr replaced after logging was set up (a test's capture, a forked child's log file) receives the lines,
    and one closed afterwards never breaks logging."""
    setup_logging()
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    log.info("to the first stream")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    log.info("to the second stream")
    assert "to the second stream" in second.getvalue()
