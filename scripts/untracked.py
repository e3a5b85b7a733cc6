"""Trainings without MLflow: `train`'s work (`training.prepare_training` + `training.fit`) and a
study of such trainings, for a machine that has PyTorch but not MLflow (a GPU machine with
nothing installed) and to time many trainings on one device.

    python scripts/untracked.py train --norm layer --seed 1 --data DATA --out runs.jsonl
    python scripts/untracked.py study --norm batch,group,layer --seeds 3 --parallel 9 \\
        --data DATA --out runs.jsonl --set cuda_graphs=off

`train` appends one JSON line to `--out`: the run's params as `train` logs them, whether its
steps ran as CUDA graphs, its per-epoch records and its timings. `study` runs every norm x seed
as its own process, `--parallel` at a time, through the study's local executor (a process per
step, each lane on its share of the cores), then prints its wall time, trainings per minute
and, for every value of `cuda_graphs` in `--out`, the final test accuracy per norm through
`compare`'s lever table (`compare --group-by cuda_graphs`, read from the JSON lines).
Nothing is registered or logged to a tracking store: accuracy figures from here are
measurements of the code path, not results of the study.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

STARTED = time.perf_counter()  # before torch's import: a run's process time includes it

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY_ROOT))

import torch  # noqa: E402

from pipeline import report, training  # noqa: E402
from pipeline.config import (  # noqa: E402
    ConfigError,
    TrainConfig,
    parse_norms,
    train_run_name,
)
from pipeline.data import DataError  # noqa: E402
from pipeline.device import precision_name  # noqa: E402
from pipeline.engine import EpochMetrics  # noqa: E402
from pipeline.executors import StepCommand  # noqa: E402
from pipeline.executors.local import LocalExecutor  # noqa: E402

FIELDS = {field.name for field in dataclasses.fields(TrainConfig)}


def parse_settings(pairs: list[str]) -> dict[str, object]:
    """`["epochs=5", "cuda_graphs=off"]` -> TrainConfig keyword arguments, typed as its fields."""
    defaults = TrainConfig()
    settings: dict[str, object] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in FIELDS or name in ("norm", "seed", "data"):
            raise ConfigError(f"--set takes train parameters NAME=VALUE (got {pair!r})")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            settings[name] = value.strip().lower() == "true"
        elif isinstance(default, int):
            settings[name] = int(value)
        elif isinstance(default, float):
            settings[name] = float(value)
        else:
            settings[name] = value
    return settings


def train_once(config: TrainConfig) -> dict:
    """One training as `train` runs it, tracking off; its record for the JSON lines."""
    setup = training.prepare_training(config)
    started = time.perf_counter()
    records = training.fit(setup, config)
    fit_seconds = time.perf_counter() - started
    return {
        "params": {
            **config.as_params(),
            "registered_model": "",
            "val_digest": setup.validation.digest if setup.validation else "",
        },
        "device": str(setup.device),
        "device_name": torch.cuda.get_device_name(setup.device)
        if setup.device.type == "cuda"
        else "",
        "cuda_graphs_used": setup.cuda_graphs,
        "autocast": precision_name(setup.autocast_dtype),
        "records": [dataclasses.asdict(record) for record in records],
        "fit_seconds": fit_seconds,
        "process_seconds": time.perf_counter() - STARTED,
    }


def append_line(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:  # one write per line: lanes append side by side
        handle.write(json.dumps(payload) + "\n")


def run_study(
    configs: list[TrainConfig], *, parallel: int, out: Path, label: str
) -> tuple[float, int]:
    """Each config a `train` process, `parallel` at once on the local executor; returns the
    wall seconds and how many trainings failed."""
    executor = LocalExecutor(parallel=parallel)
    lanes: queue.Queue[int] = queue.Queue()
    for lane in range(parallel):
        lanes.put(lane)

    def one(config: TrainConfig) -> int:
        lane = lanes.get()
        try:
            words = [sys.executable, __file__, "train", "--out", str(out), "--label", label]
            words += ["--norm", config.norm, "--seed", str(config.seed), "--data", config.data]
            for name, value in config.as_params().items():
                if name not in ("norm", "seed", "data", "registered_model"):
                    words += ["--set", f"{name}={value}"]
            step = StepCommand(
                name=train_run_name(config.norm, config.seed),
                command=shlex.join(words),
                work_dir=str(REPOSITORY_ROOT),
                env={},
            )
            return executor.run(step, lane=lane, lanes=parallel).exit_code
        finally:
            lanes.put(lane)

    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        codes = list(pool.map(one, configs))
    return time.perf_counter() - started, sum(code != 0 for code in codes)


def read_runs(path: Path, *, label: str | None = None) -> list[dict]:
    """The JSON lines of `path`, those with one of the comma-separated labels `label` if
    given, each with a run id of its own."""
    labels = None if label is None else set(label.split(","))
    runs = []
    for number, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            run = json.loads(line)
            run["run_id"] = f"{path.stem}-{number}"
            if labels is None or run.get("label") in labels:
                runs.append(run)
    return runs


def lever_table(runs: list[dict], *, group_by: tuple[str, ...] = ("cuda_graphs",)) -> str:
    """`compare --group-by ...`'s lever table over untracked runs: the same report code, fed
    the records tracking.run_records makes of tracked runs."""
    records = [
        report.RunRecord(
            run_id=run["run_id"],
            run_name=train_run_name(run["params"]["norm"], run["params"]["seed"]),
            params=run["params"],
            tags={"step": "train"},
            start_time=datetime.fromtimestamp(0, timezone.utc),
            end_time=datetime.fromtimestamp(run["process_seconds"], timezone.utc),
        )
        for run in runs
    ]
    histories = {
        run["run_id"]: [EpochMetrics(**record) for record in run["records"]] for run in runs
    }
    study = report.build_study(records, histories, group_by=group_by)
    table = report.readable_lever_table(report.lever_table(study), group_by)
    return report.markdown_table(table)


def timing_table(runs: list[dict]) -> str:
    lines = [
        "| norm | seed | cuda_graphs | graphed | final test acc % | fit s | process s |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for run in runs:
        params = run["params"]
        lines.append(
            f"| {params['norm']} | {params['seed']} | {params['cuda_graphs']} | "
            f"{'yes' if run['cuda_graphs_used'] else 'no'} | "
            f"{100 * run['records'][-1]['test_acc']:.2f} | {run['fit_seconds']:.1f} | "
            f"{run['process_seconds']:.1f} |"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python scripts/untracked.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("train", help="one training; appends its JSON line to --out")
    many = commands.add_parser("study", help="every norm x seed, --parallel processes at once")
    table = commands.add_parser("table", help="the lever table of the runs in --out")
    for command in (one, many):
        command.add_argument("--data", required=True, help="as train's --data")
        command.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="a train parameter other than norm, seed and data, e.g. cuda_graphs=off "
            "(repeatable)",
        )
        command.add_argument("--label", default="", help="a tag for these runs in --out")
    for command in (one, many, table):
        command.add_argument("--out", required=True, type=Path, help="JSON lines, appended")
    one.add_argument("--norm", default="batch")
    one.add_argument("--seed", type=int, default=1)
    many.add_argument("--norm", default="batch,group,layer")
    many.add_argument("--seeds", type=int, default=3)
    many.add_argument("--parallel", type=int, default=1)
    table.add_argument(
        "--label", default=None, help="only the runs with these labels (comma-separated)"
    )
    arguments = parser.parse_args(argv)
    if getattr(arguments, "parallel", 1) < 1:
        parser.error("--parallel must be at least 1")
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    try:
        if arguments.command == "table":
            runs = read_runs(arguments.out, label=arguments.label)
            if not runs:
                print(f"no runs labelled {arguments.label!r} in {arguments.out}")
                return 0
            print(timing_table(runs))
            print()
            print(lever_table(runs))
            return 0
        # The trainings run in the repository root: paths are made absolute first.
        settings = {"data": str(Path(arguments.data).expanduser().resolve())}
        settings.update(parse_settings(arguments.set))
        arguments.out = arguments.out.resolve()
        if arguments.command == "train":
            config = TrainConfig(norm=arguments.norm, seed=arguments.seed, **settings)
            run = train_once(config)
            append_line(arguments.out, {"label": arguments.label, **run})
            print(
                f"{config.norm} seed {config.seed}: final test accuracy "
                f"{100 * run['records'][-1]['test_acc']:.2f}%, fit {run['fit_seconds']:.1f} s, "
                f"process {run['process_seconds']:.1f} s, CUDA graphs {run['cuda_graphs_used']}"
            )
            return 0
        configs = [
            TrainConfig(norm=norm, seed=seed, **settings)
            for norm in parse_norms(arguments.norm)
            for seed in range(1, arguments.seeds + 1)
        ]
        for config in configs:
            training.build_model(config)  # every model within budget before the first starts
        earlier = len(read_runs(arguments.out)) if arguments.out.exists() else 0
        seconds, failed = run_study(
            configs, parallel=arguments.parallel, out=arguments.out, label=arguments.label
        )
        runs = read_runs(arguments.out)[earlier:] if arguments.out.exists() else []
        print(
            f"study: {len(configs)} trainings, {arguments.parallel} at once: {seconds:.1f} s wall, "
            f"{60 * len(configs) / seconds:.2f} trainings per minute, {failed} failed"
        )
        if runs:
            print(timing_table(runs))
            print()
            print(lever_table(runs))
        return 1 if failed else 0
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
