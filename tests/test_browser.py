"""The study as a user browses it: a real `main` run on synthetic data, `mlflow server` over
its store, and Debian's Chromium driven by Playwright through the MLflow UI.

Each check asserts on what the page shows (names, column values, a loaded <img>, plotly
charts with drawn points), and saves a screenshot of the page under the test's temp dir.
The page driving lives in tests/mlflow_ui.py, shared with scripts/screenshots.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import mlflow_ui
import pytest
from conftest import VAL_SIZE, mlflow_run
from mlflow.tracking import MlflowClient

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the fixture: a skip, or a failure in CI
    expect = sync_playwright = None

# Starts a study, an MLflow server and Chromium: part of the full suite, not the fast loop.
pytestmark = pytest.mark.slow

NORMS = ("batch", "layer")
SEEDS = 2
STUDY_PARAMS = {
    "norm": ",".join(NORMS),
    "seeds": SEEDS,
    "epochs": 1,  # one epoch: the study's subprocesses, not training, dominate the time
    "warmup_epochs": 0.5,
    "batch_size": 32,
    "val_size": VAL_SIZE,
    "parallel": 2,  # the four trainings two at a time: startup, not compute, is the cost
}
TRAIN_RUNS = [f"train-{norm}-seed{seed}" for norm in NORMS for seed in range(1, SEEDS + 1)]
CHILDREN = {
    "prepare-stats",
    *TRAIN_RUNS,
    *(f"evaluate-cifar10-{norm}-v{seed}" for norm in NORMS for seed in range(1, SEEDS + 1)),
    "compare",
}
EPOCH_CHARTS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds")


def _require_browser() -> str:
    """Chromium's path; skip without it, unless CI demands the browser tests run."""
    reason = None
    if sync_playwright is None:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    chromium = mlflow_ui.chromium_path()
    if reason is None and chromium is None:
        reason = (
            f"Debian's chromium is not installed at {mlflow_ui.CHROMIUM} "
            "(apt-get install -y --no-install-recommends chromium)"
        )
    if reason:
        if os.environ.get("PIPELINE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"PIPELINE_REQUIRE_SERVICES=1 but {reason}")
        pytest.skip(reason)
    return chromium


@pytest.fixture(scope="module")
def ui(tmp_path_factory, image_folder):
    """A finished study in a temp SQLite store, `mlflow server` over it, and a browser."""
    chromium = _require_browser()
    base = tmp_path_factory.mktemp("browser")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(base)  # the Default experiment keeps its artifacts in base/mlruns
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("PIPELINE_CACHE_DIR", str(base / "cache"))
        patch.setenv("TQDM_DISABLE", "1")
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        MlflowClient(tracking_uri=uri).search_experiments()  # the schema, before two processes
        # The server starts while the study runs, as `mlflow ui` beside a running study would.
        server = mlflow_ui.start_server(uri, work_dir=base / "server")
        try:
            finished = mlflow_run("main", {**STUDY_PARAMS, "data": image_folder})
            assert finished.returncode == 0, finished.stderr[-3000:]
            mlflow_ui.wait_for_server(server)
        except BaseException:
            mlflow_ui.stop_server(server)
            raise
    try:
        with sync_playwright() as playwright:
            browser = mlflow_ui.launch(playwright, executable=chromium)
            yield SimpleNamespace(
                url=server.url, browser=browser, study=mlflow_ui.find_study(uri), store=uri
            )
            browser.close()
    finally:
        mlflow_ui.stop_server(server)


@pytest.fixture
def page(ui):
    """A fresh browser context per check: no UI state carried over from another page."""
    with mlflow_ui.quiet_page(ui.browser) as page:
        yield page


def _screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"))
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000, "a blank screenshot"


def test_runs_list_nests_named_children_with_norm_and_test_acc_columns(ui, page, tmp_path):
    names = mlflow_ui.open_runs_list(page, ui.url, ui.study)
    _screenshot(page, tmp_path, "runs_list")

    links = names.get_by_role("link")
    shown = [text.strip() for text in links.all_inner_texts()]
    assert sorted(shown) == sorted({"study", *CHILDREN}), shown
    # Nested: every child is indented under the parent. Each name is shown in full in a
    # 260 px column (the UI's default 190 px cuts nested names after ~14 characters).
    parent_x = names.get_by_role("link", name="study", exact=True).bounding_box()["x"]
    for name in CHILDREN:
        link = names.get_by_role("link", name=name, exact=True)
        expect(link).to_be_visible()
        assert link.bounding_box()["x"] > parent_x, name
        assert link.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), f"{name} is cut off"

    expect(page.locator('.ag-header-cell[col-id="params.`norm`"]')).to_be_visible()
    expect(page.locator('.ag-header-cell[col-id="metrics.`test_acc`"]')).to_be_visible()
    logged = {run.info.run_name: run for run in _study_runs(ui)}
    for name in TRAIN_RUNS:
        cells = mlflow_ui.row_cells(page, ui.study.children[name])
        assert cells["params.`norm`"] == logged[name].data.params["norm"]
        accuracy = logged[name].data.metrics["test_acc"]
        # Logged without float32 noise digits (0.30000001192092896), so it fits the column.
        assert cells["metrics.`test_acc`"] == f"{accuracy:.7g}", cells


def _study_runs(ui):
    client = MlflowClient(tracking_uri=ui.store)
    return [client.get_run(run_id) for run_id in ui.study.children.values()]


def test_run_page_shows_epoch_charts_and_misclassified_images(ui, page, tmp_path):
    run_id = ui.study.children["train-layer-seed1"]
    mlflow_ui.open_run_metrics(page, ui.url, ui.study, run_id)
    for metric in EPOCH_CHARTS:
        card = mlflow_ui.chart_card(page, metric)
        expect(card).to_be_visible()
        expect(card.get_by_text(f"train-layer-seed1 ({metric})")).to_be_visible()
        expect(card.locator(".js-plotly-plot .scatterlayer path.point").first).to_be_visible()
    _screenshot(page, tmp_path, "run_metrics")

    mlflow_ui.open_artifact(page, ui.url, ui.study, run_id, "plots/misclassified.png")
    image = mlflow_ui.wait_for_image(page)
    # Readable: 25 images of 32 px drawn at 200 px each, shown near that size.
    assert image["width"] >= 800 and image["shown"] >= 600, image
    _screenshot(page, tmp_path, "misclassified")


def test_prepare_stats_shows_training_images_per_class(ui, page, tmp_path):
    run_id = ui.study.children["prepare-stats"]
    mlflow_ui.open_artifact(page, ui.url, ui.study, run_id, "samples/train_per_class.png")
    image = mlflow_ui.wait_for_image(page)
    assert image["height"] >= 1000, image  # ten rows of classes, each image drawn large
    _screenshot(page, tmp_path, "class_samples")


def test_chart_view_overlays_test_acc_per_norm(ui, page, tmp_path):
    mlflow_ui.open_chart_overlay(page, ui.url, ui.study)
    card = mlflow_ui.chart_card(page, "test_acc")
    expect(card).to_be_visible()
    for norm in NORMS:
        expect(card.get_by_text(f"{norm} (test_acc)", exact=True)).to_be_visible()
        expect(page.get_by_text(f"Group: {norm}", exact=True)).to_be_visible()
    legend = card.get_by_text(re.compile(r"\(test_acc\)$")).all_inner_texts()
    assert sorted(legend) == [f"{norm} (test_acc)" for norm in NORMS], legend
    # Overlaid: drawn lines (not the seed bands) in one colour per norm.
    expect(card.locator(".js-plotly-plot .scatterlayer path.point").first).to_be_visible()
    colours = card.locator(".scatterlayer .trace:not(.is-band)").evaluate_all(
        "els => [...new Set(els.filter(e => e.querySelector('path.point'))"
        ".map(e => e.querySelector('path.js-line').style.stroke))]"
    )
    assert len(colours) == len(NORMS), colours
    _screenshot(page, tmp_path, "chart_overlay")


def test_registry_lists_each_norms_model_with_its_champion(ui, page, tmp_path):
    rows = mlflow_ui.open_registry(page, ui.url)
    for norm in NORMS:
        row = rows.filter(has=page.get_by_role("link", name=f"cifar10-{norm}", exact=True))
        expect(row).to_have_count(1)
        expect(row).to_contain_text("champion")
        expect(row).to_contain_text(f"Version {SEEDS}")  # the latest version
    _screenshot(page, tmp_path, "registry")


def test_parent_run_report_renders(ui, page, tmp_path):
    mlflow_ui.open_artifact(page, ui.url, ui.study, ui.study.parent_run_id, "comparison/report.md")
    for heading in ("Normalization study: side by side", "Results per norm", "Findings"):
        expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
    table = page.get_by_role("table").first
    for norm in NORMS:
        expect(table.get_by_role("cell", name=norm, exact=True)).to_be_visible()
    expect(page.get_by_role("listitem").filter(has_text="norm leads").first).to_be_visible()
    _screenshot(page, tmp_path, "report")


def test_parent_run_report_html_renders_its_tables_and_figures(ui, page, tmp_path):
    mlflow_ui.open_artifact(
        page, ui.url, ui.study, ui.study.parent_run_id, "comparison/report.html"
    )
    # MLflow shows an HTML artifact in an iframe loaded from a blob: URL, so a relative image
    # would not load there: the figures are inlined as data: URIs.
    report = page.locator("iframe.mlflow-html-iframe").element_handle().content_frame()
    for heading in ("Normalization study: side by side", "Results per norm", "Findings"):
        expect(report.get_by_role("heading", name=heading, exact=True)).to_be_visible()
    table = report.get_by_role("table").first
    for norm in NORMS:
        expect(table.get_by_role("cell", name=norm, exact=True)).to_be_visible()
    figure = report.get_by_role("img", name="test accuracy and loss per epoch", exact=True)
    expect(figure).to_be_visible()
    assert figure.get_attribute("src").startswith("data:image/png;base64,")
    image = mlflow_ui.wait_for_image(report)  # a Frame has the Page's locator and wait calls
    assert image["width"] >= 1000 and image["shown"] > 0, image  # 12 inches at 110 dpi
    _screenshot(page, tmp_path, "report_html")


def test_the_comparison_tables_show_as_mlflow_tables(ui, page, tmp_path):
    """`mlflow.log_table`'s JSON is shown by the artifact view as a table, not as text."""
    mlflow_ui.open_artifact(
        page, ui.url, ui.study, ui.study.parent_run_id, "comparison/tables/norms.json"
    )
    table = page.get_by_role("table").first
    expect(table).to_be_visible()
    expect(table.get_by_text("final_val_acc_mean", exact=True).first).to_be_visible()
    for norm in NORMS:
        expect(table.get_by_text(norm, exact=True).first).to_be_visible()
    _screenshot(page, tmp_path, "tables")
