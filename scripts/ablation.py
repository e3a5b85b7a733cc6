"""Ablation of the training recipe: every lever alone against the defaults, per norm and seed,
then the levers that paid, combined, over three seeds.

Each run is `pipeline.training.prepare_training` + `fit` (what `train` runs, tracking off) for the
full `--epochs`, with the final test accuracy read after the last epoch (flip TTA on, as `train`
evaluates; the accuracies without TTA and with flip+translate TTA are recorded too). Runs go to
`--workers` processes at once (several per GPU keep it busy; on a CPU use 1). Stage 1 runs the
levers seed by seed until `--stage1-seconds` have passed; stage 2 combines, per norm, the levers
whose mean gain over the baseline (on the seeds both finished) exceeds `--min-gain` points (the
best value per knob) and runs that recipe and the baseline on every seed of `--final-seeds`.
Results stream to `--out` (JSON lines) as runs finish; the Markdown summary is printed at the end.

    python scripts/ablation.py --data ../shared/data/cifar10-dev.tar.gz --device cuda --workers 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queue_module
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY_ROOT))

from pipeline.config import NORMS, TrainConfig, parse_norms  # noqa: E402

# Widths that move parameters from the 8x8 stage to the 16x16 (mid) or 32x32 (early) stages.
WIDTHS_MID = {"C2": 32, "C3": 32, "C4": 32, "C5": 32, "C7": 24, "C8": 32, "C9": 32}
WIDTHS_EARLY = {"C1": 24, "C2": 32, "C3": 32, "C4": 32, "C5": 32, "C7": 24, "C8": 24, "C9": 32}


TRANSLATE_TTA = "test_acc_flip_translate"  # runs from before tta="flip-translate" lack it


@dataclass(frozen=True)
class Variant:
    """One lever: TrainConfig overrides and/or Net options, tried alone against the baseline."""

    name: str
    knob: str  # variants of one knob are alternatives, never combined
    config: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    norms: tuple[str, ...] = NORMS


VARIANTS = (
    Variant("baseline", "baseline"),
    Variant("ema 0.998", "ema", config={"ema": 0.998}),
    Variant("cutout 8", "cutout", config={"cutout": 8}),
    Variant("label smoothing 0", "label_smoothing", config={"label_smoothing": 0.0}),
    Variant("learning rate 0.1", "learning_rate", config={"learning_rate": 0.1}),
    Variant("learning rate 0.4", "learning_rate", config={"learning_rate": 0.4}),
    Variant("warm-up 5 epochs", "warmup_epochs", config={"warmup_epochs": 5.0}),
    Variant("batch 128", "batch_size", config={"batch_size": 128}),
    Variant("weight decay 1e-3", "weight_decay", config={"weight_decay": 1e-3}),
    Variant("widths mid", "widths", model={"widths": WIDTHS_MID}),
    Variant("widths early", "widths", model={"widths": WIDTHS_EARLY}),
    Variant("ReLU before norm", "order", model={"order": "act-norm"}),
    Variant("no weight standardization", "standardize", model={"standardize": False},
            norms=("group", "layer")),
    Variant("weight standardization", "standardize", model={"standardize": True},
            norms=("batch",)),
    Variant("groups 2", "groups", config={"groups": 2}, norms=("group",)),
    Variant("groups 8", "groups", config={"groups": 8}, norms=("group",)),
    Variant("whitening C1", "whiten", config={"whiten": True}),
    Variant("translate 2", "translate", config={"translate": 2}),
)  # fmt: skip


@dataclass(frozen=True)
class Job:
    stage: int
    norm: str
    seed: int
    name: str
    config: dict[str, Any]
    model: dict[str, Any]


def run_job(job: Job, base: dict[str, Any]) -> dict[str, Any]:
    """Train one model and return its record (runs in a worker process)."""
    import torch

    from pipeline import engine, training

    config = TrainConfig(**{**base, **job.config, "norm": job.norm, "seed": job.seed})
    started = time.perf_counter()
    setup = training.prepare_training(config, model_options=job.model)
    records = training.fit(setup, config)
    other_tta = {
        tta: engine.evaluate(
            setup.model, setup.test_split, normalize=setup.normalize, tta=tta,
            autocast_dtype=setup.autocast_dtype,
        ).accuracy
        for tta in ("none", "flip-translate")
    }  # fmt: skip
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
    return {
        **{k: v for k, v in job.__dict__.items()},
        "params": setup.parameters,
        "device": str(setup.device),
        "test_acc": records[-1].test_acc,
        "test_acc_no_tta": other_tta["none"],
        "test_acc_flip_translate": other_tta["flip-translate"],
        "best_test_acc": max(r.test_acc for r in records),
        "train_acc": records[-1].train_acc,
        "test_curve": [round(r.test_acc, 5) for r in records],
        "epoch_seconds": statistics.mean(r.epoch_seconds for r in records),
        "wall_seconds": time.perf_counter() - started,
    }


def _worker(jobs, results, base: dict[str, Any]) -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    while (job := jobs.get()) is not None:
        try:
            results.put(run_job(job, base))
        except Exception as error:  # one failed run must not stop the study
            results.put({**job.__dict__, "error": f"{type(error).__name__}: {error}"})


class Pool:
    """Worker processes fed one job at a time, so the caller decides what runs next."""

    def __init__(self, workers: int, base: dict[str, Any]) -> None:
        context = multiprocessing.get_context("spawn")
        self.jobs, self.results = context.Queue(), context.Queue()
        self.processes = [
            context.Process(target=_worker, args=(self.jobs, self.results, base), daemon=True)
            for _ in range(workers)
        ]
        for process in self.processes:
            process.start()
        self.busy = 0

    def run(self, queue: list[Job], *, deadline: float, out, finished: list[dict]) -> None:
        """Run `queue` in order, starting no job after `deadline`; wait for those started."""
        queue = list(queue)
        while queue or self.busy:
            while queue and self.busy < len(self.processes) and time.monotonic() < deadline:
                self.jobs.put(queue.pop(0))
                self.busy += 1
            if not self.busy:
                break
            record = self._next_result()
            self.busy -= 1
            finished.append(record)
            out.write(json.dumps(record) + "\n")
            out.flush()
            status = record.get("error") or f"{100 * record['test_acc']:.2f}%"
            print(
                f"[{time.strftime('%H:%M:%S')}] stage {record['stage']} {record['norm']:<5} "
                f"seed {record['seed']} {record['name']}: {status}",
                flush=True,
            )
        if queue:
            print(f"deadline: {len(queue)} stage runs not started", flush=True)

    def _next_result(self) -> dict:
        while True:
            try:
                return self.results.get(timeout=5)
            except queue_module.Empty:
                dead = [p.exitcode for p in self.processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"a worker process died (exit code {dead[0]})") from None

    def close(self) -> None:
        for _ in self.processes:
            self.jobs.put(None)
        for process in self.processes:
            process.join(timeout=30)


def scores(records: list[dict], stage: int | None = None) -> dict[tuple[str, str], dict]:
    """{(norm, name): {seed: test_acc}} over finished runs."""
    table: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for record in records:
        if "error" in record or (stage is not None and record["stage"] != stage):
            continue
        table[record["norm"], record["name"]][record["seed"]] = record["test_acc"]
    return table


def gain(table, norm: str, name: str) -> tuple[float, int] | None:
    """Mean gain in points over the baseline on the seeds both have, and how many seeds."""
    mine, base = table.get((norm, name), {}), table.get((norm, "baseline"), {})
    shared = sorted(set(mine) & set(base))
    if not shared:
        return None
    return 100 * statistics.mean(mine[s] - base[s] for s in shared), len(shared)


def combine(table, norm: str, *, min_gain: float) -> tuple[str, dict, dict, list[str]]:
    """The recipe of `norm`'s paying levers: the best variant per knob above `min_gain`."""
    best_per_knob: dict[str, tuple[float, Variant]] = {}
    for variant in VARIANTS:
        if variant.name == "baseline" or norm not in variant.norms:
            continue
        measured = gain(table, norm, variant.name)
        if measured is None or measured[0] <= min_gain:
            continue
        if variant.knob not in best_per_knob or measured[0] > best_per_knob[variant.knob][0]:
            best_per_knob[variant.knob] = (measured[0], variant)
    chosen = [variant for _, variant in best_per_knob.values()]
    config: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for variant in chosen:
        config.update(variant.config)
        model.update(variant.model)
    names = [variant.name for variant in chosen]
    return "combined: " + (" + ".join(names) or "nothing paid"), config, model, names


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}"


def report(records: list[dict], arguments: argparse.Namespace) -> str:
    lines = [
        "## Ablation",
        "",
        f"- Command: `python scripts/ablation.py {' '.join(arguments.argv)}`"
        + (f": the summary of the runs in `{arguments.report}`" if arguments.report else ""),
        f"- Runs: {sum('error' not in r for r in records)} finished, "
        f"{sum('error' in r for r in records)} failed; {arguments.epochs} epochs each, "
        f"device {records[0]['device'] if records and 'device' in records[0] else '?'}",
        "",
        "Stage 1: each lever alone; test accuracy % (flip TTA) mean ± std over seeds, and the "
        "mean gain over the baseline on the same seeds.",
        "",
        "| norm | lever | params | seeds | test acc % | gain (points) | no-TTA % | "
        "flip+translate TTA % |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    table = scores(records, stage=1)
    by_key = defaultdict(list)
    for record in records:
        if "error" not in record:
            by_key[record["stage"], record["norm"], record["name"]].append(record)
    for norm in arguments.norms:
        for variant in VARIANTS:
            runs = by_key.get((1, norm, variant.name), [])
            if not runs:
                continue
            measured = gain(table, norm, variant.name)
            shown = "" if variant.name == "baseline" or measured is None else f"{measured[0]:+.2f}"
            lines.append(
                f"| {norm} | {variant.name} | {runs[0]['params']:,} | {len(runs)} | "
                f"{mean_std([r['test_acc'] for r in runs])} | {shown} | "
                f"{mean_std([r['test_acc_no_tta'] for r in runs])} | "
                f"{mean_std([r[TRANSLATE_TTA] for r in runs if TRANSLATE_TTA in r])} |"
            )
    lines += [
        "",
        "Stage 2: the paying levers combined against the baseline, on the final seeds.",
        "",
        "| norm | recipe | params | seeds | test acc % | best epoch acc % | train acc % | "
        "s/epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for norm in arguments.norms:
        names = sorted({r["name"] for r in records if r["stage"] == 2 and r["norm"] == norm})
        for name in ["baseline"] + [n for n in names if n != "baseline"]:
            runs = by_key.get((2, norm, name), [])
            if name == "baseline":  # the baseline's stage-1 seeds count too
                runs = runs + [
                    r for r in by_key.get((1, norm, name), []) if r["seed"] in arguments.final_seeds
                ]
            if not runs:
                continue
            lines.append(
                f"| {norm} | {name} | {runs[0]['params']:,} | {len(runs)} | "
                f"{mean_std([r['test_acc'] for r in runs])} | "
                f"{mean_std([r['best_test_acc'] for r in runs])} | "
                f"{mean_std([r['train_acc'] for r in runs])} | "
                f"{statistics.mean(r['epoch_seconds'] for r in runs):.2f} |"
            )
    return "\n".join(lines) + "\n"


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python scripts/ablation.py", description=__doc__)
    parser.add_argument("--data", default="../shared/data/cifar10-dev.tar.gz")
    parser.add_argument("--norms", default="batch,group,layer")
    parser.add_argument("--seeds", default="1,2", help="stage-1 seeds, in the order they run")
    parser.add_argument("--final-seeds", default="1,2,3", help="stage-2 seeds")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", help="fp32 keeps GPU runs like the CPU's")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--stage1-seconds", type=float, default=float("inf"))
    parser.add_argument("--total-seconds", type=float, default=float("inf"))
    parser.add_argument("--min-gain", type=float, default=0.15, help="points")
    parser.add_argument("--out", default="ablation.jsonl")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated lever names to try; NORM:NAME tries a lever on one norm only",
    )
    parser.add_argument(
        "--report", default="", help="print the summary of an earlier --out file; run nothing"
    )
    arguments = parser.parse_args(argv)
    arguments.argv = argv
    arguments.norms = parse_norms(arguments.norms)
    arguments.seeds = [int(s) for s in arguments.seeds.split(",") if s]
    arguments.final_seeds = [int(s) for s in arguments.final_seeds.split(",") if s]
    data = Path(arguments.data).expanduser()
    arguments.data = str(data if data.is_absolute() else (Path.cwd() / data).resolve())
    return arguments


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    if arguments.report:
        lines = Path(arguments.report).read_text().splitlines()
        print(report([json.loads(line) for line in lines if line.strip()], arguments))
        return 0
    from pipeline import data as datasets

    started = time.monotonic()
    dataset = datasets.load_dataset(arguments.data)  # decode once; the workers read the cache
    datasets.cached_stats(dataset)
    base = {
        "data": arguments.data,
        "epochs": arguments.epochs,
        "batch_size": arguments.batch_size,
        "device": arguments.device,
        "precision": arguments.precision,
        "warmup_epochs": min(TrainConfig().warmup_epochs, arguments.epochs),
    }
    only = {name.strip() for name in arguments.only.split(",") if name.strip()}
    stage1 = [
        Job(1, norm, seed, variant.name, variant.config, variant.model)
        for seed in arguments.seeds
        for norm in arguments.norms
        for variant in VARIANTS
        if norm in variant.norms
        and (not only or {variant.name, f"{norm}:{variant.name}"} & (only | {"baseline"}))
    ]
    records: list[dict] = []
    pool = Pool(arguments.workers, base)
    try:
        with open(arguments.out, "a") as out:
            pool.run(stage1, deadline=started + arguments.stage1_seconds, out=out, finished=records)
            table = scores(records, stage=1)
            stage2 = []
            for seed in arguments.final_seeds:
                for norm in arguments.norms:
                    name, config, model, chosen = combine(table, norm, min_gain=arguments.min_gain)
                    if chosen:
                        stage2.append(Job(2, norm, seed, name, config, model))
                    if seed not in table.get((norm, "baseline"), {}):
                        stage2.append(Job(2, norm, seed, "baseline", {}, {}))
            pool.run(stage2, deadline=started + arguments.total_seconds, out=out, finished=records)
    finally:
        pool.close()
    print(report(records, arguments))
    print(f"total {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
