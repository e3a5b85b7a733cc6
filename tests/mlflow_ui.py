"""Drive the MLflow UI in headless Chromium: the pages a user opens to browse a study.

Shared by tests/test_browser.py, which asserts on what each page shows, and
scripts/screenshots.py, which saves the same pages as PNGs for docs/screenshots. Each `open_*`
function leaves the page showing one view and returns the locators worth checking; it does
what a user would do (expand the parent run, pick columns, group by `norm`), so it works on
any study, and with a fresh browser context it does not depend on earlier visits.

The selectors were found on the live MLflow 3.17 UI (a React single-page app with hash
routes, ag-grid tables and plotly charts); where the UI offers no label or test id they lean
on the structure (the only button in a run-name cell is its expander).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Playwright cannot download its own browser here: Debian's chromium, offline and quiet.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
)
VIEWPORT = {"width": 1600, "height": 900}
# The first load of the UI's bundle on a busy 2-core machine takes seconds, not milliseconds.
TIMEOUT_MS = 60_000
# What the UI stores once a user has closed its first-visit pop-ups (the assistant panel,
# the registry's "new UI" promotion); set up front so they do not cover the page.
QUIET_UI_STORAGE = {
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "_mlflow_model_registry_promo_modal_dismissed_v1": "true",
    "_mlflow_dark_mode_toggle_enabled": "false",
}
RUN_NAME_COLUMN = '[col-id="attributes.`Run Name`"]'


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen
    url: str
    log: Path


def start_server(backend_store_uri: str, *, work_dir: Path, port: int | None = None) -> Server:
    """Start `mlflow server` over the store on a free loopback port (not waiting for it).

    Runs logged straight into the store keep their local artifact paths, which the server
    reads; `--artifacts-destination` is where runs created through it would put theirs.
    """
    port = port or free_port()
    work_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(work_dir / "mlartifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = work_dir / "server.log"
    with open(log, "wb") as output:  # the server keeps its own copy of the descriptor
        process = subprocess.Popen(
            command, cwd=work_dir, env=env, stdout=output, stderr=subprocess.STDOUT
        )
    return Server(process=process, url=f"http://127.0.0.1:{port}", log=log)


def wait_for_server(server: Server, *, timeout: float = 120) -> None:
    """Block until the server's /health answers; fail with its log's tail if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mlflow server exited ({server.process.returncode}):\n{tail}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {server.url} did not answer within {timeout:.0f} s")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


# --------------------------------------------------------------------------- browser


def chromium_path() -> str | None:
    """Debian's chromium, or None when it is not installed."""
    return CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")


def launch(playwright, *, executable: str = CHROMIUM):
    return playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))


@contextmanager
def quiet_page(browser, *, viewport: dict[str, int] | None = None) -> Iterator:
    """A page in a fresh context (no UI state from earlier visits), pop-ups pre-dismissed."""
    context = browser.new_context(viewport=viewport or VIEWPORT)
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(
        "for (const [k, v] of Object.entries(" + json.dumps(QUIET_UI_STORAGE) + ")) "
        "{ if (localStorage.getItem(k) === null) localStorage.setItem(k, v); }"
    )
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


def _goto(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")


# --------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class Study:
    """The ids a browsing session needs: the study's experiment, parent and child runs.

    A study made by `main` has a parent run; one made step by step (`-e train` per norm,
    then `-e compare`) has none, and its "children" are the experiment's finished runs."""

    experiment_id: str
    parent_run_id: str | None
    children: dict[str, str]  # run name -> run id (the newest, when names repeat)
    norms: tuple[str, ...]  # of the train runs

    def run_id(self, prefix: str) -> str:
        """The first child whose name starts with `prefix` (names sort `seed1` first)."""
        for name in sorted(self.children):
            if name.startswith(prefix):
                return self.children[name]
        raise KeyError(f"no child run named {prefix}* among {sorted(self.children)}")


STEPS = ("prepare-stats", "train", "evaluate", "compare")


def find_study(tracking_uri: str, *, experiment_name: str | None = None) -> Study:
    """The newest FINISHED `main` parent run (tag step=main) and its children; without one,
    the finished pipeline runs of the experiment holding the newest train run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if experiment_name:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            raise LookupError(f"no experiment named {experiment_name!r} at {tracking_uri}")
        experiment_ids = [experiment.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]

    def newest(query: str):
        found = client.search_runs(
            experiment_ids,
            f"{query} and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return found[0] if found else None

    parent = newest("tags.step = 'main'")
    anchor = parent or newest("tags.step = 'train'")
    if anchor is None:
        raise LookupError(f"no finished study (a `main` or `train` run) at {tracking_uri}")
    query = (
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        if parent
        else "attributes.status = 'FINISHED'"
    )
    runs = client.search_runs(
        [anchor.info.experiment_id],
        query,
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    if not parent:
        runs = [run for run in runs if run.data.tags.get("step") in STEPS]
    return Study(
        experiment_id=anchor.info.experiment_id,
        parent_run_id=parent.info.run_id if parent else None,
        children={run.info.run_name: run.info.run_id for run in runs},
        norms=tuple(
            sorted(
                {
                    run.data.params["norm"]
                    for run in runs
                    if run.data.tags.get("step") == "train" and "norm" in run.data.params
                }
            )
        ),
    )


def run_link(page, run_id: str):
    """The link to a run, wherever the page lists it."""
    return page.locator(f'a[href$="/runs/{run_id}"]')


# --------------------------------------------------------------------------- pages


def open_runs_list(
    page,
    base_url: str,
    study: Study,
    *,
    columns: tuple[tuple[str, str], ...] = (("Parameters", "norm"), ("Metrics", "test_acc")),
    hide: tuple[str, ...] = ("Dataset",),
    name_width: int = 260,
):
    """The experiment's runs table with the study's parent expanded and `columns` added
    (section, name); returns the run-name cells. `hide` drops attribute columns that would
    push the added ones off screen; the run-name column is widened as a user would drag it."""
    _goto(page, f"{base_url}/#/experiments/{study.experiment_id}/runs")
    names = page.locator(f"[role=gridcell]{RUN_NAME_COLUMN}")
    child = run_link(names, next(iter(study.children.values())))
    if study.parent_run_id:
        parent = names.filter(has=run_link(page, study.parent_run_id))
        parent.wait_for()
        if not child.count():  # collapsed: the only button in the cell is the expander
            parent.locator("button").first.click()
    child.wait_for()
    _select_columns(page, add=columns, remove=hide)
    _widen_column(page, RUN_NAME_COLUMN, name_width)
    return names


def _select_columns(page, *, add, remove) -> None:
    wanted = [
        (section, name)
        for section, name in add
        if not page.locator(f'.ag-header-cell[col-id="{_column_id(section, name)}"]').count()
    ]
    if not wanted and not remove:
        return
    page.get_by_role("button", name="Columns", exact=True).click()
    dialog = page.get_by_role("dialog")
    search = dialog.get_by_placeholder("Search columns")
    for section, name in wanted:
        search.fill(name)
        # Search narrows the tree to matching leaves under their section headers; a leaf's
        # section is the nearest header above it.
        node = _tree_leaf(dialog, section, name)
        node.locator(".du-bois-light-tree-checkbox").click()
        page.locator(f'.ag-header-cell[col-id="{_column_id(section, name)}"]').wait_for()
    for name in remove:
        search.fill(name)
        node = _tree_leaf(dialog, "Attributes", name)
        if "checkbox-checked" in (
            node.locator(".du-bois-light-tree-checkbox").get_attribute("class") or ""
        ):
            node.locator(".du-bois-light-tree-checkbox").click()
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")


def _tree_leaf(dialog, section: str, name: str):
    nodes = dialog.get_by_test_id("column-selector-tree").locator(".du-bois-light-tree-treenode")
    nodes.first.wait_for()
    texts = [text.strip() for text in nodes.all_inner_texts()]
    current = ""
    for index, text in enumerate(texts):
        header = re.fullmatch(r"(Attributes|Metrics|Parameters|Tags)( \(\d+\))?", text)
        if header:
            current = header.group(1)
        elif current == section and text == name:
            return nodes.nth(index)
    raise LookupError(f"column {section} > {name} is not offered (the tree shows {texts})")


def _column_id(section: str, name: str) -> str:
    prefix = {"Parameters": "params", "Metrics": "metrics", "Tags": "tags"}[section]
    return f"{prefix}.`{name}`"


def _widen_column(page, column_selector: str, width: int) -> None:
    header = page.locator(f".ag-header-cell{column_selector}")
    box = header.bounding_box()
    if box is None or box["width"] >= width:
        return
    handle = header.locator(".ag-header-cell-resize")
    handle_box = handle.bounding_box()
    # The grip straddles the border; its left half lies inside this header, above the next.
    x = handle_box["x"] + 2
    y = handle_box["y"] + handle_box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + width - box["width"], y, steps=10)
    page.mouse.up()


def row_cells(page, run_id: str) -> dict[str, str]:
    """The text of each cell in the run's row, keyed by column id (ag-grid splits a row
    between its pinned and scrolling parts; `row-index` ties them together)."""
    name_cell = page.locator(f"[role=gridcell]{RUN_NAME_COLUMN}").filter(has=run_link(page, run_id))
    index = name_cell.locator("xpath=ancestor::*[@row-index][1]").get_attribute("row-index")
    cells = page.locator(f'.ag-row[row-index="{index}"] [role=gridcell]')
    return {
        cell["id"]: cell["text"]
        for cell in cells.evaluate_all(
            "els => els.map(e => ({id: e.getAttribute('col-id'), text: e.innerText.trim()}))"
        )
        if cell["id"]
    }


def open_run_metrics(page, base_url: str, study: Study, run_id: str):
    """A run's *Model metrics* tab; returns its plotly charts."""
    _goto(page, f"{base_url}/#/experiments/{study.experiment_id}/runs/{run_id}/model-metrics")
    cards = page.locator(".js-plotly-plot")
    cards.first.wait_for()
    return cards


def chart_card(page, title: str):
    """The chart card whose title is exactly `title` (run page and experiment chart view)."""
    heading = page.locator(f'h4[title="{title}"]').first
    return heading.locator("xpath=ancestor::*[.//*[contains(@class,'js-plotly-plot')]][1]")


def open_artifact(page, base_url: str, study: Study, run_id: str, path: str) -> None:
    """A run's *Artifacts* tab with `path` selected in the tree, as a user clicks to it;
    returns once the preview's header (the path) shows; its content may still be loading."""
    _goto(page, f"{base_url}/#/experiments/{study.experiment_id}/runs/{run_id}/artifacts")
    *folders, file_name = path.split("/")
    for folder in folders:
        page.get_by_text(folder, exact=True).first.click()
    page.get_by_text(file_name, exact=True).first.click()
    page.get_by_text(path, exact=True).first.wait_for()


def loaded_images(page) -> list[dict[str, int]]:
    """Each <img> on the page that loaded and is displayed: natural and displayed size."""
    return page.locator("img").evaluate_all(
        "els => els.filter(e => e.complete && e.naturalWidth > 0 && e.clientWidth > 0)"
        ".map(e => ({width: e.naturalWidth, height: e.naturalHeight, shown: e.clientWidth}))"
    )


def wait_for_image(page) -> dict[str, int]:
    """Wait until an <img> has loaded and is displayed; returns the first such image."""
    page.wait_for_function(
        "[...document.images].some(i => i.complete && i.naturalWidth > 0 && i.clientWidth > 0)"
    )
    return loaded_images(page)[0]


def open_chart_overlay(
    page,
    base_url: str,
    study: Study,
    *,
    filter_string: str = "tags.step = 'train' and attributes.status = 'FINISHED'",
    group_by: str = "norm",
):
    """The experiment's chart view of the study's train runs, grouped by the `group_by`
    param, so each chart overlays one line per norm; returns the chart cards.

    The parent run comes along with its children and makes a group of its own (its `norm` is
    the list, `batch,layer`); that group has no metrics, and is hidden, as a user would."""
    query = urllib.parse.urlencode({"searchFilter": filter_string, "compareRunsMode": "CHART"})
    _goto(page, f"{base_url}/#/experiments/{study.experiment_id}/runs?{query}")
    # Grouping also lifts the children out from under their collapsed parent.
    page.get_by_role("button", name="Group by", exact=True).click()
    menu = page.get_by_role("menu")
    # The menu lists tags before params; a `norm` tag would come first.
    menu.get_by_role("menuitemcheckbox", name=group_by, exact=True).last.click()
    page.keyboard.press("Escape")
    page.get_by_text(f"Group by: {group_by}").wait_for()
    groups = page.locator(".ag-row").filter(has_text="Group: ")
    groups.first.wait_for()
    for row in groups.all():
        label = re.search(r"Group: (\S+)", row.inner_text())
        if label and label.group(1) not in study.norms:
            row.locator("label").filter(has_text="Hide group").click()
    cards = page.get_by_test_id("experiment-view-compare-runs-card")
    cards.first.wait_for()
    return cards


def open_registry(page, base_url: str):
    """The registered models list; returns its table rows."""
    _goto(page, f"{base_url}/#/models")
    rows = page.locator("tbody tr, [role=row]").filter(has=page.get_by_role("link"))
    rows.first.wait_for()
    return rows
