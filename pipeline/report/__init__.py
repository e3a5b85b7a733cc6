"""Runs -> a side-by-side report of the norms (no MLflow here): `records` is what the report
reads of a run, `frame` turns the runs into a Study, `tables`, `levers` and `findings` make its
tables and what is said about them, `render` writes report.md and report.html.
"""

from pipeline.records import RunRecord, recipe_value
from pipeline.report.findings import divergence_notes, findings
from pipeline.report.frame import Study, build_study, row_label, step_runs
from pipeline.report.levers import (
    PairedGain,
    lever_table,
    paired_gain,
    readable_lever_table,
    set_aside,
    set_aside_note,
    tta_table,
)
from pipeline.report.render import write_report
from pipeline.report.robustness import (
    readable_robustness_table,
    robustness_findings,
    robustness_table,
)
from pipeline.report.tables import (
    batch_dependence,
    markdown_table,
    norm_table,
    per_class_table,
    percent,
    readable_norm_table,
    run_summary,
)

__all__ = [
    "PairedGain",
    "RunRecord",
    "Study",
    "batch_dependence",
    "divergence_notes",
    "build_study",
    "findings",
    "lever_table",
    "markdown_table",
    "norm_table",
    "paired_gain",
    "per_class_table",
    "percent",
    "readable_lever_table",
    "readable_norm_table",
    "readable_robustness_table",
    "recipe_value",
    "robustness_findings",
    "robustness_table",
    "row_label",
    "run_summary",
    "set_aside",
    "set_aside_note",
    "step_runs",
    "tta_table",
    "write_report",
]
