"""The study's report: report.md with its CSV tables and figures, and report.html, the same
page in one file for MLflow's artifact view (no MLflow here).

`write_report` writes everything into one directory, which cli.compare logs as the run's
`comparison` artifacts; report.md's links are relative, so they resolve inside that directory.
"""

from __future__ import annotations

import base64
from pathlib import Path
from xml.etree import ElementTree

import matplotlib

matplotlib.use("Agg")  # headless: figures are written to files

import markdown  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from markdown.extensions import Extension  # noqa: E402
from markdown.treeprocessors import Treeprocessor  # noqa: E402

from pipeline.config import TrainConfig  # noqa: E402
from pipeline.plots import (  # noqa: E402
    batch_dependence_figure,
    misclassified_figure,
    overlay_figure,
    per_class_figure,
    train_vs_test_figure,
)
from pipeline.report.findings import divergence_notes, findings  # noqa: E402
from pipeline.report.frame import Study  # noqa: E402
from pipeline.report.levers import (  # noqa: E402
    ADOPT_MIN_SEEDS,
    ADOPT_STANDARD_ERRORS,
    lever_table,
    readable_lever_table,
    readable_tta_table,
    set_aside_note,
    tta_table,
)
from pipeline.report.robustness import robustness_section  # noqa: E402
from pipeline.report.tables import (  # noqa: E402
    batch_dependence,
    markdown_table,
    norm_table,
    per_class_table,
    percent,
    readable_batch_dependence,
    readable_norm_table,
    run_summary,
    spread,
)


def write_report(study: Study, directory: Path) -> Path:
    """Write report.md (and report.html), norms.csv/.md, runs.csv, the optional sections' CSVs
    and plots/*.png into `directory`; returns the report's path.

    Each section is a function of the study and the directory that writes its files and
    returns its Markdown lines, none where it has nothing to show.
    """
    directory.mkdir(parents=True, exist_ok=True)
    sections = [
        _results_section,
        _batch_dependence_section,
        _lever_section,
        _tta_section,
        robustness_section,
        _curves_section,
        _misclassified_section,
        _per_class_section,
        _runs_section,
    ]
    text = "\n".join(line for section in sections for line in section(study, directory))
    report = directory / "report.md"
    report.write_text(text)
    # MLflow's Markdown viewer shows relative images as text; its HTML viewer renders this copy,
    # with the figures inlined.
    (directory / "report.html").write_text(markdown_to_html(text, base=directory))
    return report


def _results_section(study: Study, directory: Path) -> list[str]:
    """The title, the per-norm table (norms.csv, norms.md, runs.csv) and the findings."""
    summary = run_summary(study)
    table = norm_table(study)
    table.to_csv(directory / "norms.csv", index=False)
    summary.to_csv(directory / "runs.csv", index=False)
    readable = readable_norm_table(table)
    (directory / "norms.md").write_text(markdown_table(readable) + "\n")
    return [
        "# Normalization study: side by side",
        "",
        f"Compared: {study.source or 'selected runs'}; {len(summary)} train runs "
        f"({', '.join(study.norms) or 'none'}), {study.per_class['run_id'].nunique()} "
        "evaluated models.",
        "",
        "## Results per norm",
        "",
        markdown_table(readable),
        "",
        "Accuracies are percentages after the last epoch, mean ± standard error over the "
        "*runs* (the SE needs two or more). *Val*: the validation split, `val_size` training "
        "images held out of training, on which every choice is made (the findings' ranking, "
        "the lever tables, the registry's `champion`); *test*: the test split, reported and "
        "never chosen on. Gap = final train minus final test accuracy. *Epoch s*: mean "
        "seconds per epoch (training and evaluation); *run min*: wall time of a train run "
        "from start to end as the tracking store recorded it (data, epochs, logging, "
        "registration). `groups` applies to group norm only. "
        "Machine-readable: [norms.csv](norms.csv), per run: [runs.csv](runs.csv).",
        "",
        "## Findings",
        "",
        *[f"- {note}" for note in [*findings(table), *divergence_notes(study)]],
        "",
    ]


def _batch_dependence_section(study: Study, directory: Path) -> list[str]:
    dependence = batch_dependence(study)
    if dependence is None:
        return []
    points, references = dependence
    points.to_csv(directory / "batch_dependence.csv", index=False)
    _save(
        batch_dependence_figure(points, references),
        directory / "plots" / "batch_dependence.png",
    )
    return [
        "## Batch-size dependence",
        "",
        "![final test accuracy against images per statistics group](plots/batch_dependence.png)",
        "",
        markdown_table(readable_batch_dependence(points, references)),
        "",
        "Final test accuracy against the images each batch-statistics group holds "
        "(`norm_batch`; the whole batch where it is 0), with the optimizer batch, schedule "
        "and step count of the recipe: only the statistics change (Wu & He, Group "
        "Normalization, 2018, Figure 1). Line: mean over the runs, band: their min-max; "
        "norms without batch statistics are flat dashed references. Reported on the test "
        "split, not chosen on. Machine-readable: [batch_dependence.csv](batch_dependence.csv).",
        "",
    ]


def _lever_section(study: Study, directory: Path) -> list[str]:
    if not study.group_by:
        return []
    levers = lever_table(study)
    levers.to_csv(directory / "levers.csv", index=False)
    keys = ", ".join(f"`{key}`" for key in study.group_by)
    note = set_aside_note(study)
    return [
        f"## Levers: runs grouped by {keys}",
        "",
        markdown_table(readable_lever_table(levers, study.group_by)),
        "",
        *([note, ""] if note else []),
        "Ranked per norm by final validation accuracy, mean ± standard error over seeds. "
        "Val gain: the mean difference in points from the norm's default recipe (the row "
        "marked *default*: every grouped parameter at `train`'s default, and every other "
        "training setting that varies between the norm's runs at its recipe), paired on the "
        "seeds both ran on the same validation split, ± its standard error. *Adopt?*: yes "
        f"only where that gain exceeds {ADOPT_STANDARD_ERRORS:g} standard errors over "
        f"{ADOPT_MIN_SEEDS} or more seeds. The test accuracy is reported beside it and "
        "chooses nothing. Machine-readable: [levers.csv](levers.csv).",
        "",
    ]


def _tta_section(study: Study, directory: Path) -> list[str]:
    if "tta" not in study.evaluated or study.evaluated["tta"].nunique() < 2:
        return []
    ttas = tta_table(study)
    ttas.to_csv(directory / "tta.csv", index=False)
    return [
        "## Test-time augmentation",
        "",
        markdown_table(readable_tta_table(ttas)),
        "",
        "From the evaluate runs: test accuracy per `tta`, mean ± standard error over the "
        f"evaluated models; gain over `tta={TrainConfig().tta}` on the same models, ± its "
        "standard error. On the test split: reported, not a basis for choosing a `tta`. "
        "Machine-readable: [tta.csv](tta.csv).",
        "",
    ]


def _curves_section(study: Study, directory: Path) -> list[str]:
    if study.history.empty:
        return []
    # One line per row of the table: a batch-dependence sweep's statistics groups apart.
    lines = dict(zip(study.lines["label"], study.lines["norm"], strict=True))
    _save(overlay_figure(study.history, lines), directory / "plots" / "test_curves.png")
    _save(
        train_vs_test_figure(study.history, lines, titles=study.line_names("{norm} norm")),
        directory / "plots" / "train_vs_test.png",
    )
    return [
        "## Test accuracy and loss per epoch",
        "",
        "![test accuracy and loss per epoch](plots/test_curves.png)",
        "",
        "## Train vs test",
        "",
        "![train vs test accuracy per norm](plots/train_vs_test.png)",
        "",
    ]


def _misclassified_section(study: Study, directory: Path) -> list[str]:
    if not study.misclassified:
        return []
    _save(
        misclassified_figure(study.misclassified, study.norms),
        directory / "plots" / "misclassified.png",
    )
    return [
        "## Misclassified test images",
        "",
        "The first seed of each norm, side by side:",
        "",
        "![misclassified test images per norm](plots/misclassified.png)",
        "",
    ]


def _per_class_section(study: Study, directory: Path) -> list[str]:
    classes = per_class_table(study)
    if classes.empty:
        return []
    classes.to_csv(directory / "per_class_accuracy.csv")
    _save(per_class_figure(classes), directory / "plots" / "per_class_accuracy.png")
    return [
        "## Per-class test accuracy (%)",
        "",
        markdown_table((100 * classes).round(2), index=True),
        "",
        "![per-class accuracy per norm](plots/per_class_accuracy.png)",
        "",
        "From the evaluate runs' evaluation.json: "
        "[per_class_accuracy.csv](per_class_accuracy.csv).",
        "",
    ]


def _runs_section(study: Study, directory: Path) -> list[str]:
    summary = run_summary(study)
    runs = summary[["run_name", "run_id", "norm", "seed"]].copy()
    runs["final val acc %"] = [percent(v) for v in summary["final_val_acc"]]
    runs["best val acc %"] = [percent(v) for v in summary["best_val_acc"]]
    runs["final test acc %"] = [percent(v) for v in summary["final_test_acc"]]
    runs["final train acc %"] = [percent(v) for v in summary["final_train_acc"]]
    runs["epoch s"] = [f"{v:.1f}" for v in summary["epoch_seconds"]]
    runs["run min"] = [spread(v) for v in summary["run_minutes"]]
    return ["## Runs", "", markdown_table(runs), ""]


def markdown_to_html(text: str, *, base: Path) -> str:
    """The report's Markdown (Python-Markdown with pipe tables) as one self-contained HTML page;
    images under `base` become data URIs, links stay relative."""
    body = markdown.markdown(text, extensions=["tables", _SelfContained(base=base)])
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
        "img{max-width:100%}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Normalization study</title>"
        f"<style>{style}</style></head><body>\n" + body + "\n</body></html>\n"
    )


class _SelfContained(Extension):
    """Text stays text, and images are inlined, so the page needs nothing beside it."""

    def __init__(self, *, base: Path):
        super().__init__()
        self.base = base

    def extendMarkdown(self, md: markdown.Markdown) -> None:
        # The report quotes run names and filter strings: show them as typed, never as markup.
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        # After the inline patterns (priority 20) have made the <img> elements.
        md.treeprocessors.register(_InlineImages(md, base=self.base), "inline_images", 5)


class _InlineImages(Treeprocessor):
    """Each <img> whose src is a file under `base` gets that file as a data URI: MLflow shows
    report.html from a blob: URL, where a relative src would not resolve."""

    def __init__(self, md: markdown.Markdown, *, base: Path):
        super().__init__(md)
        self.base = base

    def run(self, root: ElementTree.Element) -> None:
        for image in root.iter("img"):
            path = self.base / image.get("src", "")
            if path.is_file():
                encoded = base64.b64encode(path.read_bytes()).decode("ascii")
                image.set("src", f"data:image/png;base64,{encoded}")


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
