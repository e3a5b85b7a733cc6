"""Runs -> a side-by-side report of the norms (no MLflow here): `frame` turns the runs
DataFrame into a Study, `tables` makes its tables and findings, `render` writes report.md
and report.html.
"""

from pipeline.report.frame import Study, build_study, step_runs
from pipeline.report.render import write_report
from pipeline.report.tables import (
    PairedGain,
    batch_dependence,
    divergence_notes,
    findings,
    lever_table,
    markdown_table,
    norm_table,
    paired_gain,
    per_class_table,
    percent,
    readable_lever_table,
    readable_norm_table,
    run_summary,
    tta_table,
)

__all__ = [
    "PairedGain",
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
    "run_summary",
    "step_runs",
    "tta_table",
    "write_report",
]
