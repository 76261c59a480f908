"""``trackers.json``: which experiment-tracker run (MLflow, W&B) a run folder logs to, so a resumed run continues
the same tracker run. A pointer, never part of the record: it is written outside the epoch commit (atomically,
by the folder's writer, :meth:`okd.runs.store.RunStore.record_tracker_ids`) and a new run's start removes it."""

from __future__ import annotations

import json
from pathlib import Path

TRACKERS_FILE = "trackers.json"


def read_tracker_ids(run_dir: str | Path) -> dict[str, dict[str, str]]:
    """``{tracker: {"run_id": ..., ...}}`` of a run folder; empty when it has none or the file is unreadable
    (a tracker then starts a new tracker run: the run folder, the record, is never affected)."""
    path = Path(run_dir) / TRACKERS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("run_id"), str)}


def tracker_ids_text(ids: dict[str, dict[str, str]]) -> str:
    return json.dumps(ids, indent=1, sort_keys=True) + "\n"
