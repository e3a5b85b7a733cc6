"""What the report reads of a run, as one plain record: tracked runs (tracking.run_records
converts MLflow's) and tracking-free ones (scripts/untracked.py) reach the report the same way.

tracking.py adapts MLflow to it, so the report never sees MLflow's column names (`params.norm`,
`metrics.test_acc`) and runs where MLflow is not installed. Standard library only, at the bottom
of the package: `train` logs `RESOLVED_PARAMS`, the report and `registry show` read them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

# The recipe a train run resolved (its norm's recipe where the option was left at "per norm"),
# logged as `resolved.<name>` beside the option as given. Runs from before logged the resolved
# value as the plain param.
RESOLVED_PREFIX = "resolved."
# The settings a run resolves from its config ("auto" and 0 to the norm's recipe), then what
# its set-up resolved: the precision and the device it ran on.
RESOLVED_SETTINGS = (
    "optimizer",
    "activation",
    "pool",
    "batch_size",
    "learning_rate",
    "muon_lr",
    "translate",
)
RESOLVED_PARAMS = (*RESOLVED_SETTINGS, "precision", "device")


@dataclass(frozen=True)
class RunRecord:
    """One run as the report reads it: params and tags as logged (strings), the last value of
    each metric, and its status and times."""

    run_id: str
    run_name: str = ""
    status: str = "FINISHED"
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)
    start_time: datetime | None = None
    end_time: datetime | None = None

    def is_step(self, step: str) -> bool:
        """A run of the study's `step` (train, evaluate): tagged so by the study's driver, or
        started as that MLproject entry point."""
        return step in (self.tags.get("step"), self.tags.get("mlflow.project.entryPoint"))


def recipe_value(params: Mapping[str, str], name: str) -> str | None:
    """The value of recipe parameter `name` the run trained with: `resolved.<name>` where the
    run logged it, else the plain param (runs from before logged the resolved value there);
    None where it logged neither. Any other param is read as logged."""
    resolved = params.get(f"{RESOLVED_PREFIX}{name}") if name in RESOLVED_PARAMS else None
    return resolved if resolved is not None else params.get(name)
