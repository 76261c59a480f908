"""The run folder: its writer (:mod:`~okd.runs.store`), record formats (:mod:`~okd.runs.records`), metrics.csv
(:mod:`~okd.runs.metrics`), what may change on resume (:mod:`~okd.runs.resume_policy`) and its one reader
(:class:`~okd.runs.reader.Run`). The whole contract: docs/run-folder.md."""
