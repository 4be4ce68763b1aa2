"""Fault-injection harness shared by the crash-safety tests and `bench/bench_faults.py`.

A stage is a command line (e.g. `lesiongen train ...`). `run_with_kills` starts it, sends SIGKILL after a seeded
random delay, starts it again (the stage must resume), and repeats; the last run goes to completion. Compare the
result with an uninterrupted run of the same command with `tree_digest` (every file's SHA-256) and `leftover_temps`.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TEMP_PATTERNS = (".tmp-", ".tmp")  # names `lesiongen.core` gives temp files and folders


@dataclass
class KillReport:
    "What happened to one stage under fault injection"
    kills: int = 0                # runs that were SIGKILLed while still working
    early_exits: int = 0          # runs that finished before their kill time came
    resumes_ok: int = 0           # runs after a kill that started without error (finished or were killed again)
    returncodes: list = field(default_factory=list)  # exit code of every run; -9 for a killed run
    stderr_tail: str = ""         # last lines of stderr of the final run


def _env(extra: dict | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def run_with_kills(cmd: list[str],          # the stage's command line; the same one is re-run to resume
                   kills: int,              # how many runs to SIGKILL before the final run
                   seed: int = 0,           # seeds the kill times
                   min_s: float = 0.5,      # earliest kill, seconds after a run starts
                   max_s: float = 5.0,      # latest kill
                   timeout: float = 600,    # limit for the final, uninterrupted run
                   env: dict | None = None, # extra environment variables
                   cwd: str | Path | None = None,
                   ) -> KillReport:
    "Run `cmd`, SIGKILL it `kills` times at seeded random moments, then let a last run finish"
    rng, rep = random.Random(seed), KillReport()
    killed_before = False
    for _ in range(kills):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(env), cwd=cwd,
                                start_new_session=True)
        deadline = time.monotonic() + rng.uniform(min_s, max_s)
        while proc.poll() is None and time.monotonic() < deadline: time.sleep(0.02)
        if proc.poll() is None:
            try: os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError: pass  # it exited between the poll and the kill
        proc.wait()
        if proc.returncode == -signal.SIGKILL: rep.kills += 1
        else: rep.early_exits += 1  # finished (or failed) before its kill time: counted by its exit code, not as a kill
        err = proc.stderr.read().decode(errors="replace"); proc.stderr.close()
        rep.returncodes.append(proc.returncode)
        if killed_before and proc.returncode in (0, -signal.SIGKILL): rep.resumes_ok += 1
        if proc.returncode not in (0, -signal.SIGKILL):
            rep.stderr_tail = "\n".join(err.strip().splitlines()[-5:]); return rep
        killed_before = proc.returncode == -signal.SIGKILL
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(env), cwd=cwd,
                          timeout=timeout)
    rep.returncodes.append(done.returncode)
    if killed_before and done.returncode == 0: rep.resumes_ok += 1
    rep.stderr_tail = "\n".join(done.stderr.decode(errors="replace").strip().splitlines()[-5:])
    return rep


def tree_digest(folder: str | Path,          # an output folder
                ignore: tuple[str, ...] = (), # relative paths (or their first parts) left out, e.g. timing logs
                ) -> dict[str, str]:
    "SHA-256 of every file under `folder`, by relative path"
    folder, out = Path(folder), {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not any(rel == i or rel.startswith(i.rstrip("/") + "/") for i in ignore):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftover_temps(folder: str | Path) -> list[str]:
    "Temp files or folders left anywhere under `folder`"
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")
                  if any(t in p.name for t in TEMP_PATTERNS))


def lesiongen_cmd(*args: str) -> list[str]:
    "The `lesiongen` console script of this interpreter's environment, with `args`"
    return [str(Path(sys.executable).parent / "lesiongen"), *args]
