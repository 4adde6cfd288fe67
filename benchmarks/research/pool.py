"""The process pool of the research reproduction: every run trains in its own one-thread process, up to
``parallel`` at once, and a run counts as done once its ``run.json`` holds the same spec (so an interrupted
reproduction resumes at the next missing run, and a run still training from an earlier invocation is adopted
through its ``pid`` file instead of started twice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


class RunPool:
    """Runs specs (dicts with ``name``, ``kind``, ``run_dir`` and the ``plan``) as ``python <entry> --worker
    <run_dir>/spec.json`` (``--probe-worker`` for ``kind == "probe"``)."""

    def __init__(self, entry: str | Path, parallel: int = 1):
        self.entry, self.parallel = str(entry), parallel
        self.pending: list[dict] = []
        self.running: dict[str, tuple] = {}
        self.failed: list[str] = []
        self.after: list[tuple[dict, dict]] = []  # (prerequisite, run): submitted once the prerequisite is done

    def submit(self, *specs: dict) -> None:
        for spec in specs:
            if spec["name"] not in self.running and spec not in self.pending and not self.done(spec):
                self.pending.append(spec)

    def submit_after(self, prerequisite: dict, spec: dict) -> None:
        """Submit ``spec`` once ``prerequisite`` is done (e.g. a training run on the mask a probe run writes)."""
        self.after.append((prerequisite, spec))

    def pump(self) -> None:
        """Reap finished runs and start pending ones. A run whose process is alive from an earlier invocation
        (``pid`` file, same ``spec.json``) is adopted instead of started twice."""
        for name, (spec, process, log, start) in list(self.running.items()):
            if process is None:  # adopted
                pid = int((Path(spec["run_dir"]) / "pid").read_text())
                finished = self.done(spec) or not _alive(pid)
                code = 0 if self.done(spec) else 1
            else:
                finished, code = process.poll() is not None, process.returncode
            if not finished:
                continue
            if log is not None:
                log.close()
            del self.running[name]
            if code:
                self.failed.append(name)
                print(f"[{name}] FAILED (exit {code}), see {spec['run_dir']}/log.txt", flush=True)
            else:
                print(f"[{name}] done in {time.perf_counter() - start:.0f}s", flush=True)
        for item in list(self.after):
            if self.done(item[0]):
                self.after.remove(item)
                self.submit(item[1])
        while self.pending and len(self.running) < self.parallel:
            spec = self.pending.pop(0)
            run_dir = Path(spec["run_dir"])
            pid_file, spec_file = run_dir / "pid", run_dir / "spec.json"
            if (pid_file.exists() and spec_file.exists() and json.loads(spec_file.read_text()) == spec
                    and _alive(int(pid_file.read_text()))):
                print(f"[{spec['name']}] adopting the run already in progress", flush=True)
                self.running[spec["name"]] = (spec, None, None, time.perf_counter())
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            spec_file.write_text(json.dumps(spec, indent=1))
            steps = spec.get("max_steps", spec["plan"]["steps"])
            print(f"[{spec['name']}] training ({spec['kind']}, {steps} steps) ...", flush=True)
            log = (run_dir / "log.txt").open("w")
            worker = "--probe-worker" if spec["kind"] == "probe" else "--worker"
            process = subprocess.Popen([sys.executable, self.entry, worker, str(spec_file)], stdout=log,
                                       stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            pid_file.write_text(str(process.pid))
            self.running[spec["name"]] = (spec, process, log, time.perf_counter())

    def wait(self, *specs: dict, until: Callable[[], bool] | None = None) -> None:
        """Pump until the given runs are done (or ``until()`` is true); raise if one of them failed."""
        self.submit(*specs)
        while True:
            self.pump()
            failed = [s["name"] for s in specs if s["name"] in self.failed]
            if failed:
                raise RuntimeError(f"runs failed: {failed}")
            if (until is not None and until()) or (until is None and all(self.done(s) for s in specs)):
                return
            time.sleep(5)

    def run(self, spec: dict) -> dict:
        """The finished run's record (``run.json``), training it first if needed."""
        self.wait(spec)
        return json.loads((Path(spec["run_dir"]) / "run.json").read_text())

    @staticmethod
    def done(spec: dict) -> bool:
        done = Path(spec["run_dir"]) / "run.json"
        return done.exists() and json.loads(done.read_text())["spec"] == spec


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
