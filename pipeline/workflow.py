"""The `main` workflow: prepare-stats once, train each norm x seed, evaluate each model, compare.

This module decides which steps run, in what order and with which parameters, and runs them:
tracking.py creates each step's run as `mlflow run` would (a child of the study's parent run),
and `StepRunner` runs the entry point's command in it, up to `parallel` steps at once. A step
that already FINISHED with the same parameters and code version is reused instead of rerun.
"""

from __future__ import annotations

import codecs
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking
from pipeline.config import EvalConfig, TrainConfig, check_int_range

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parent.parent
MAX_SEEDS = 100
MAX_PARALLEL = 64


class StepFailed(tracking.TrackingError):
    """A workflow step failed; the message names the step and its error."""


@dataclass(frozen=True)
class Step:
    """One child run: `name` is its run name, a human can tell the steps apart by it."""

    name: str
    entry_point: str
    parameters: dict[str, str]
    reuse: bool = True


@dataclass(frozen=True)
class StepResult:
    step: Step
    run_id: str  # the run holding the results: the reused run when `reused`
    reused: bool


def study_configs(norms: Sequence[str], seeds: int, **train_options) -> list[TrainConfig]:
    """One validated TrainConfig per norm and seed (seeds 1..seeds), before any run starts."""
    check_int_range("seeds", seeds, low=1, high=MAX_SEEDS)
    return [
        TrainConfig(norm=norm, seed=seed, **train_options)
        for norm in norms
        for seed in range(1, seeds + 1)
    ]


def check_parallel(parallel: int) -> None:
    check_int_range("parallel", parallel, low=1, high=MAX_PARALLEL)


def code_version(project_dir: Path = PROJECT_DIR) -> str:
    """A hash of pipeline/*.py and MLproject: what `mlflow.source.git.commit` would be, except
    that it also changes with uncommitted edits, so a dirty tree never reuses stale results."""
    digest = hashlib.sha256()
    for file in [*sorted((project_dir / "pipeline").rglob("*.py")), project_dir / "MLproject"]:
        if file.is_file():
            digest.update(file.relative_to(project_dir).as_posix().encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def run_study(
    configs: Sequence[TrainConfig],
    *,
    project_dir: Path = PROJECT_DIR,
    parallel: int = 1,
    echo: Callable[[str], None] = log.info,
) -> list[StepResult]:
    """Run the study's steps as children of the active run and return them in order.

    The steps of one stage (the trainings, the evaluations) are independent: up to `parallel`
    of them run at once, each on its own share of the CPU cores.
    """
    check_parallel(parallel)
    runner = StepRunner(
        project_dir=project_dir, version=code_version(project_dir), parallel=parallel, echo=echo
    )
    execute = runner.execute
    first = configs[0]

    (prepared,) = execute([Step("prepare-stats", "prepare-stats", {"data": first.data})])
    stats = first.stats or f"runs:/{prepared.run_id}/stats.json"

    trained = execute(
        [
            Step(
                f"train-{config.norm}-seed{config.seed}",
                "train",
                dataclasses.replace(config, stats=stats).as_params(),
            )
            for config in configs
        ]
    )

    evaluations = []
    for config, result in zip(configs, trained, strict=True):
        model_uri = tracking.registered_model_uri(result.run_id, config.registered_model)
        evaluation = EvalConfig(model_uri=model_uri, data=config.data, device=config.device)
        evaluations.append(
            Step(
                f"evaluate-{_model_label(model_uri, result.run_id)}",
                "evaluate",
                evaluation.as_params(),
            )
        )
    evaluated = execute(evaluations)

    (compared,) = execute(
        [
            Step(
                "compare",
                "compare",
                {"parent_run_id": runner.parent_run_id, "experiment_name": "", "filter_string": ""},
                reuse=False,
            )
        ]
    )
    return [prepared, *trained, *evaluated, compared]


def _model_label(model_uri: str, run_id: str) -> str:
    """`cifar10-layer-v3` for models:/cifar10-layer/3, as the evaluate run names itself."""
    if model_uri.startswith("models:/"):
        name, version = model_uri[len("models:/") :].split("/", 1)
        return f"{name}-v{version}"
    return run_id[:8]


def cpu_shares(count: int, cpus: Sequence[int]) -> list[set[int]]:
    """Split `cpus` into `count` disjoint shares (sizes differ by at most one); with more
    steps than cores, each step gets one core, shared round-robin."""
    cpus = sorted(cpus)
    if count <= len(cpus):
        return [set(cpus[index::count]) for index in range(count)]
    return [{cpus[index % len(cpus)]} for index in range(count)]


class StepRunner:
    """Runs steps as child runs of the active run, up to `parallel` at once.

    Each step is a subprocess in its own session; on Ctrl-C or SIGTERM every running step gets
    SIGTERM (its run ends KILLED) before the interrupt goes on. With `parallel` > 1 each step
    is pinned to its share of the cores (torch sizes its thread pool from the affinity mask, so
    the steps do not oversubscribe the CPU), and its output lines are prefixed with its name.
    """

    def __init__(
        self, *, project_dir: Path, version: str, parallel: int, echo: Callable[[str], None]
    ) -> None:
        self.project_dir = project_dir
        self.version = version
        self.parallel = parallel
        self.parent_run_id = tracking.active_run_id()
        self.experiment_id = tracking.active_experiment_id()
        self._echo = echo
        self._output = threading.Lock()  # one writer at a time: lines never interleave
        self._running: set[subprocess.Popen] = set()
        self._running_lock = threading.Lock()

    def echo(self, message: str) -> None:
        with self._output:
            self._echo(message)

    def execute(self, steps: Sequence[Step]) -> list[StepResult]:
        """Run (or reuse) `steps`; return their results in order. A failed step fails the
        stage: steps not yet started are skipped, steps already running finish (so their runs
        are complete, and reused by the next study)."""
        results: list[StepResult | None] = [self._reuse(step) for step in steps]
        pending = [index for index, result in enumerate(results) if result is None]
        workers = min(self.parallel, len(pending))
        failures: list[StepFailed] = []
        if workers <= 1:
            for index in pending:
                results[index] = self._run(steps[index])
        else:
            if hasattr(os, "sched_getaffinity"):
                shares = cpu_shares(workers, os.sched_getaffinity(0))
            else:
                shares = [None] * workers
            free: queue.SimpleQueue = queue.SimpleQueue()
            for share in shares:
                free.put(share)

            def job(step: Step) -> StepResult:
                share = free.get()
                try:
                    return self._run(step, cpus=share, prefix=f"[{step.name}] ")
                finally:
                    free.put(share)

            with concurrent.futures.ThreadPoolExecutor(workers, "step") as pool:
                futures = {index: pool.submit(job, steps[index]) for index in pending}
                try:
                    for index, future in futures.items():
                        if future.cancelled():
                            continue
                        try:
                            results[index] = future.result()
                        except StepFailed as error:
                            failures.append(error)
                            for waiting in futures.values():
                                waiting.cancel()  # only those not yet started
                except BaseException:  # Ctrl-C or SIGTERM lands in this (the main) thread
                    for future in futures.values():
                        future.cancel()
                    self._stop_running()
                    raise
        if failures:
            raise failures[0]
        return results

    def _reuse(self, step: Step) -> StepResult | None:
        if not step.reuse:
            return None
        found = tracking.find_finished_step(
            entry_point=step.entry_point, parameters=step.parameters, code_version=self.version
        )
        if not found:
            return None
        tracking.record_reused_step(original_run_id=found, run_name=step.name)
        self.echo(f"step {step.name}: reusing finished run {found} (same parameters and code)")
        return StepResult(step, found, reused=True)

    def _run(
        self, step: Step, *, cpus: set[int] | None = None, prefix: str | None = None
    ) -> StepResult:
        created = tracking.create_project_step(
            project_dir=self.project_dir,
            entry_point=step.entry_point,
            parameters=step.parameters,
            run_name=step.name,
            experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id,
        )
        env = {**os.environ, **created.env}
        if prefix is not None:
            env["TQDM_DISABLE"] = "1"  # progress bars of several steps would garble each other
        if cpus is not None:
            # Linux: the affinity of this thread, inherited by the child it starts.
            os.sched_setaffinity(0, cpus)
            env["OMP_NUM_THREADS"] = str(len(cpus))
        where = f" on cores {','.join(map(str, sorted(cpus)))}" if cpus is not None else ""
        self.echo(f"step {step.name}: running entry point {step.entry_point}{where}")
        tail: deque[str] = deque(maxlen=50)
        process = subprocess.Popen(
            ["bash", "-c", created.command],
            cwd=created.work_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # so that a stop reaches the whole step, bash and python
        )
        with self._running_lock:
            self._running.add(process)
        pumps = [
            threading.Thread(target=self._pump, args=(process.stdout, sys.stdout, prefix, None)),
            threading.Thread(target=self._pump, args=(process.stderr, sys.stderr, prefix, tail)),
        ]
        for pump in pumps:
            pump.start()
        try:
            code = process.wait()
        except BaseException:  # an interrupt while this (the main) thread waits
            self._stop_running()
            raise
        finally:
            for pump in pumps:
                pump.join(timeout=30)
            with self._running_lock:
                self._running.discard(process)
        status = tracking.end_project_step(
            created.run_id, succeeded=code == 0, code_version=self.version
        )
        if code != 0 or status != "FINISHED":
            reason = _error_line(tail) or f"exit code {code}, run {status}"
            raise StepFailed(f"step {step.name} failed: {reason}")
        self.echo(f"step {step.name}: finished run {created.run_id}")
        return StepResult(step, created.run_id, reused=False)

    def _pump(self, stream, sink, prefix: str | None, tail: deque[str] | None) -> None:
        """Copy a step's output to ours: unchanged when alone, whole prefixed lines when in
        parallel; keep its last stderr lines for the error message."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while chunk := stream.read1(65536):
            text = decoder.decode(chunk)
            pending += text
            *lines, pending = pending.split("\n")
            if tail is not None:
                tail.extend(line.rstrip("\r") for line in lines)
            if prefix is None:
                out = text
            else:
                out = "".join(f"{prefix}{line}\n" for line in lines)
            if out:
                with self._output:
                    sink.write(out)
                    sink.flush()
        pending += decoder.decode(b"", final=True)
        if pending:
            if tail is not None:
                tail.append(pending)
            if prefix is not None:
                with self._output:
                    sink.write(f"{prefix}{pending}\n")
                    sink.flush()
        stream.close()

    def _stop_running(self, grace_seconds: float = 60) -> None:
        """SIGTERM every running step (each ends its run KILLED) and wait for them to exit."""
        with self._running_lock:
            running = list(self._running)
        for process in running:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in running:
            try:
                process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _error_line(lines: Sequence[str]) -> str:
    """The child's one-line `error: ...` message, else its last line of output."""
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :]
    return next((line for line in reversed(lines) if line.strip()), "")
