"""Screenshots of a study in the MLflow UI, for the README: the runs list, the test_acc
overlay per norm, a run's misclassified images and the model registry.

    python scripts/screenshots.py                          # the study at $MLFLOW_TRACKING_URI
    python scripts/screenshots.py sqlite:///mlflow.db      # starts `mlflow server` over it
    python scripts/screenshots.py http://127.0.0.1:5000 --out docs/screenshots

It finds the newest finished study (a `main` parent run), drives Debian's Chromium through
the same pages as tests/test_browser.py (tests/mlflow_ui.py) and writes palette PNGs,
each under --max-kb, into --out.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the page objects the browser tests use
import mlflow_ui  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "tracking_uri",
        nargs="?",
        default=os.environ.get("MLFLOW_TRACKING_URI", ""),
        help="http(s):// of a running server, or a store (sqlite:///...) to serve locally "
        "(default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--experiment-name", default=None, help="default: search them all")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    parser.add_argument(
        "--run", default="train-", help="the run (name prefix) whose misclassified images to show"
    )
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--max-kb", type=int, default=300, help="size limit of each PNG")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        parser.error("give a tracking URI or set MLFLOW_TRACKING_URI")
    return args


def absolute_store_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` relative to here, so a server started elsewhere finds it."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def optimised_png(png: bytes, *, max_bytes: int) -> bytes:
    """A palette PNG of `png`, with fewer colours until it fits `max_bytes`."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    for colours in (256, 128, 64, 32):
        quantised = image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
        buffer = io.BytesIO()
        quantised.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_bytes:
            return buffer.getvalue()
    raise ValueError(f"a screenshot stays over {max_bytes // 1024} KB; use a smaller viewport")


def pages(study: mlflow_ui.Study, base_url: str, run: str) -> dict[str, Callable]:
    """File name -> what to show in the page before the screenshot."""

    def misclassified(page) -> None:
        mlflow_ui.open_artifact(page, base_url, study, study.run_id(run), "plots/misclassified.png")
        mlflow_ui.wait_for_image(page)

    return {
        "runs.png": lambda page: mlflow_ui.open_runs_list(page, base_url, study),
        "chart_overlay.png": lambda page: mlflow_ui.open_chart_overlay(page, base_url, study),
        "misclassified.png": misclassified,
        "registry.png": lambda page: mlflow_ui.open_registry(page, base_url),
    }


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    args = parse_args(argv)
    chromium = mlflow_ui.chromium_path()
    if chromium is None:
        sys.exit(f"error: no chromium at {mlflow_ui.CHROMIUM} (apt-get install chromium)")
    uri = absolute_store_uri(args.tracking_uri)
    study = mlflow_ui.find_study(uri, experiment_name=args.experiment_name)
    print(
        f"study {study.parent_run_id} in experiment {study.experiment_id}: "
        f"{len(study.children)} child runs"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if uri.startswith(("http://", "https://")):
            base_url = uri.rstrip("/")
        else:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            server = mlflow_ui.start_server(uri, work_dir=work_dir)
            stack.callback(mlflow_ui.stop_server, server)
            mlflow_ui.wait_for_server(server)
            base_url = server.url
            print(f"serving {uri} at {base_url}")
        playwright = stack.enter_context(sync_playwright())
        browser = mlflow_ui.launch(playwright, executable=chromium)
        stack.callback(browser.close)
        viewport = {"width": args.width, "height": args.height}
        for name, show in pages(study, base_url, args.run).items():
            with mlflow_ui.quiet_page(browser, viewport=viewport) as page:
                show(page)
                page.wait_for_timeout(500)  # let charts and images finish drawing
                png = optimised_png(page.screenshot(), max_bytes=args.max_kb * 1024)
            path = args.out / name
            path.write_bytes(png)
            print(f"{path}  {len(png) / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
