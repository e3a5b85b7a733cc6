"""The Ray executor: each step a Ray task, on a local Ray instance or a cluster.

The driver keeps owning the MLflow runs; a task runs the step's command with the run's
`MLFLOW_*` variables in the project's code, which reaches every node through Ray's
`runtime_env` working_dir. Ray's own MLflow integration is not used: it would log flat
duplicate runs. Ray is an optional dependency (`pip install -e ".[ray]"`), imported only here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pipeline.executors.base import NODE_ENV, StepCommand, StepLost, StepOutcome, error_line

log = logging.getLogger(__name__)

# Kept out of what runtime_env uploads to the nodes: stores, caches and outputs, not code.
UPLOAD_EXCLUDES = [
    ".git",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "docs",
    "outputs",
]


def _run_command(
    command: str, env: dict[str, str], prefix: str, cores: int
) -> tuple[int, str, str]:
    """The task: run `command` in the uploaded project on `cores` cores of its node it claims
    (none: unpinned), print its lines (Ray forwards them to the driver), return (exit code,
    error line, node id)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    with contextlib.ExitStack() as held:
        claimed = _claim_cores(cores, held)
        return (*_run_step(command, {**env, NODE_ENV: node}, prefix, claimed), node)


def _claim_cores(count: int, held: contextlib.ExitStack) -> set[int] | None:
    """Claim `count` cores of this node that no other step holds (one lock file per core,
    released with `held`), or None where fewer are free.

    Ray counts CPUs but does not pin its tasks: two one-CPU steps side by side wander over the
    node's cores together with Ray's own processes. Pinned as the local executor pins its
    lanes, the epochs run as fast as there.
    """
    from filelock import Timeout

    from pipeline.stores import file_lock

    if count < 1 or not hasattr(os, "sched_getaffinity"):
        return None
    claimed: set[int] = set()
    with contextlib.ExitStack() as trying:
        for cpu in sorted(os.sched_getaffinity(0)):
            lock = file_lock("ray-core", str(cpu), reentrant=False)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            trying.callback(lock.release)
            claimed.add(cpu)
            if len(claimed) == count:
                held.push(trying.pop_all())
                return claimed
    return None


def _run_step(
    command: str, env: dict[str, str], prefix: str, cores: set[int] | None
) -> tuple[int, str]:
    """Run the step's command in its own session, on `cores` when given; (exit code, error line)."""
    tail: collections.deque[str] = collections.deque(maxlen=50)
    env = {**os.environ, **env, "TQDM_DISABLE": "1"}
    if cores is not None:
        env["OMP_NUM_THREADS"] = str(len(cores))

    def start() -> None:
        _own_session_dying_with_parent()
        if cores is not None:
            os.sched_setaffinity(0, cores)

    process = subprocess.Popen(
        ["bash", "-c", command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        preexec_fn=start,
    )
    try:
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            sys.stdout.write(f"{prefix}{line}\n")
            sys.stdout.flush()
        code = process.wait()
    except BaseException:  # the task interrupted: stop its step first
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        raise
    return code, error_line(tail)


def _lost_errors(ray) -> tuple[type[Exception], ...]:
    """What `ray.get` raises when a task's node or worker went away."""
    return (
        ray.exceptions.TaskCancelledError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.LocalRayletDiedError,
        ray.exceptions.ObjectLostError,
    )


def _own_session_dying_with_parent() -> None:
    """In the step's process before it starts: its own session (a cancel stops the whole
    step), and on Linux killed with the task's worker, so a lost node leaves no step behind
    still writing into a run the driver has ended FAILED."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RayExecutor:
    """Runs each step as a Ray task needing `cpus_per_trial` CPUs (and `gpus_per_trial` GPUs,
    fractions allowed, asked for only where the cluster has GPUs)."""

    def __init__(
        self,
        *,
        project_dir: Path,
        parallel: int = 1,
        address: str = "",
        cpus_per_trial: float = 1.0,
        gpus_per_trial: float = 0.0,
        object_store_memory: int | None = None,
    ) -> None:
        # Every step's lines, not Ray's "[repeated 9x across cluster]" digest of them: read when
        # Ray is imported, so set before.
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        import ray

        self.parallel = parallel
        self._ray = ray
        init = {
            "runtime_env": {"working_dir": str(project_dir), "excludes": UPLOAD_EXCLUDES},
            "include_dashboard": False,
            "logging_level": logging.WARNING,
        }
        if address:
            init["address"] = address
        else:  # a new local instance, even where RAY_ADDRESS names a cluster
            init["address"] = "local"
            # the steps return a few bytes: a small object store will do
            init["object_store_memory"] = object_store_memory or 128 * 2**20
        # ray.init installs signal handlers that abort the driver; the workflow's own handling
        # (cancel every task, each step ends its run KILLED) must stay in place.
        handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        ray.init(**init)
        for number, handler in handlers.items():
            signal.signal(number, handler)
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        self._options = {
            "num_cpus": cpus_per_trial,
            "num_gpus": gpus_per_trial if has_gpus else 0,
            "max_retries": 0,  # a lost step is rerun as a new run by the workflow, never here
        }
        # torch sizes its thread pool from the cores it sees, all of the node's under Ray:
        # hold each step to the CPUs it asked for, so steps side by side do not oversubscribe.
        self._cores = int(cpus_per_trial) if cpus_per_trial >= 1 else 0
        self._threads = str(max(1, self._cores))
        self._task = ray.remote(_run_command)
        self._running: set = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def placement(self, *, lane: int, lanes: int) -> str:
        return " on Ray"

    def run(self, step: StepCommand, *, lane: int = 0, lanes: int = 1) -> StepOutcome:
        ray = self._ray
        prefix = f"[{step.name}] " if lanes > 1 else ""
        env = {**step.env, "PIPELINE_THREADS": self._threads}
        reference = self._task.options(**self._options).remote(
            step.command, env, prefix, self._cores
        )
        with self._lock:
            self._running.add(reference)
        try:
            code, line, node = ray.get(reference)
        except Exception as error:
            if self._stopping.is_set():
                # stop() cancelled the task, and a forced cancel surfaces as any of
                # TaskCancelledError, WorkerCrashedError or a RayTaskError wrapping the
                # interrupt: the step was killed either way.
                return StepOutcome(130, "interrupted", killed=True)
            if not isinstance(error, _lost_errors(ray)):
                raise
            reason = f"its Ray node or worker died ({type(error).__name__})"
            raise StepLost(f"step {step.name}: {reason}") from None
        finally:
            with self._lock:
                self._running.discard(reference)
        if code != 0 and self._stopping.is_set():
            # The cancel's kill reached the step's process before its worker (Ray kills a
            # worker's children as it exits), so the task returned the signal's exit code.
            return StepOutcome(code, "interrupted", killed=True, node=node)
        return StepOutcome(code, line, node=node)

    def stop(self) -> None:
        """Cancel every running task. A cancel kills the task's worker (a step blocked in its
        training does not see Ray's KeyboardInterrupt), and the step dies with it; `run`
        reports those steps killed, so the workflow ends their runs KILLED."""
        self._stopping.set()
        with self._lock:
            running = list(self._running)
        for reference in running:
            self._ray.cancel(reference, force=True)
        for reference in running:
            try:
                self._ray.get(reference, timeout=90)
            except Exception:  # cancelled, or gone: either way no longer running
                pass

    def close(self) -> None:
        """Disconnect; a local Ray instance started here shuts down with it."""
        self._ray.shutdown()
