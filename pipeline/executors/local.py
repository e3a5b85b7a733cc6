"""The local executor: each step a subprocess on this host, up to `parallel` at once, each
pinned to its share of the cores."""

from __future__ import annotations

import codecs
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence

from pipeline.executors.base import OUTPUT_LOCK, StepCommand, StepOutcome, error_line


def cpu_shares(count: int, cpus: Sequence[int]) -> list[set[int]]:
    """Split `cpus` into `count` disjoint shares (sizes differ by at most one); with more
    steps than cores, each step gets one core, shared round-robin."""
    cpus = sorted(cpus)
    if count <= len(cpus):
        return [set(cpus[index::count]) for index in range(count)]
    return [{cpus[index % len(cpus)]} for index in range(count)]


class LocalExecutor:
    """Runs each step as a subprocess in its own session.

    On Ctrl-C or SIGTERM every running step gets SIGTERM (its run ends KILLED) before the
    interrupt goes on. When steps share the machine each is pinned to its share of the cores
    (torch sizes its thread pool from the affinity mask, so the steps do not oversubscribe the
    CPU) and its output lines are prefixed with its name.
    """

    def __init__(self, *, parallel: int = 1) -> None:
        self.parallel = parallel
        self._running: set[subprocess.Popen] = set()
        self._stopped: set[subprocess.Popen] = set()  # by `stop`: their runs end KILLED
        self._running_lock = threading.Lock()

    def _cpus(self, lane: int, lanes: int) -> set[int] | None:
        """The cores of a lane when steps share the machine (Linux), else None."""
        if lanes <= 1 or not hasattr(os, "sched_getaffinity"):
            return None
        return cpu_shares(lanes, os.sched_getaffinity(0))[lane]

    def placement(self, *, lane: int, lanes: int) -> str:
        cpus = self._cpus(lane, lanes)
        return f" on cores {','.join(map(str, sorted(cpus)))}" if cpus is not None else ""

    def run(self, step: StepCommand, *, lane: int = 0, lanes: int = 1) -> StepOutcome:
        env = {**os.environ, **step.env}
        prefix = None
        if lanes > 1:
            prefix = f"[{step.name}] "
            env["TQDM_DISABLE"] = "1"  # progress bars of several steps would garble each other
        cpus = self._cpus(lane, lanes)
        if cpus is not None:
            # Linux: the affinity of this thread, inherited by the child it starts.
            os.sched_setaffinity(0, cpus)
            env["OMP_NUM_THREADS"] = str(len(cpus))
        tail: deque[str] = deque(maxlen=50)
        process = subprocess.Popen(
            ["bash", "-c", step.command],
            cwd=step.work_dir,
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
            self.stop()
            raise
        finally:
            for pump in pumps:
                pump.join(timeout=30)
            with self._running_lock:
                self._running.discard(process)
                killed = process in self._stopped
                self._stopped.discard(process)
        return StepOutcome(code, error_line(tail), killed=killed)

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
                with OUTPUT_LOCK:
                    sink.write(out)
                    sink.flush()
        pending += decoder.decode(b"", final=True)
        if pending:
            if tail is not None:
                tail.append(pending)
            if prefix is not None:
                with OUTPUT_LOCK:
                    sink.write(f"{prefix}{pending}\n")
                    sink.flush()
        stream.close()

    def close(self) -> None:
        """Nothing to release: every step's process has ended by now."""

    def stop(self, grace_seconds: float = 60) -> None:
        """SIGTERM every running step (each ends its run KILLED) and wait for them to exit."""
        with self._running_lock:
            running = list(self._running)
            self._stopped.update(process for process in running if process.poll() is None)
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
