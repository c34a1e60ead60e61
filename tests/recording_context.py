"""A worker context that keeps what the loop reports, for tests that run :func:`facescale.train.loop.run_worker`
in this process (no Ray, no torchrun)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from facescale.train.context import WorkerContext


@dataclass
class RecordingContext(WorkerContext):
    reports: list[dict[str, Any]] = field(default_factory=list)

    def report(self, metrics: dict[str, Any]) -> None:
        self.reports.append(dict(metrics))
