r"""The harness's private directories: one per machine, named after the process that owns it,
and swept once that process has ended.

QEMU dies with its Python parent (PDEATHSIG), but a parent that is SIGKILLed or ``os._exit``\ s
cannot remove its directory; a later machine start anywhere on the host does: each process's
first start, then one start every ``SWEEP_INTERVAL`` seconds (the scan of the temp directory is
not worth doing on every one of a suite's thousands of starts).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

_WORKDIR_PREFIX = "qtest-virtio-"
#: Seconds between two sweeps by the same process.
SWEEP_INTERVAL = 30.0
#: When a process last swept, by (pid, parent directory): a forked child sweeps on its own.
_last_sweep: dict[tuple[int, str], float] = {}


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc/PID/stat, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _workdir_prefix() -> str:
    """``qtest-virtio-<pid>-<start time>-``: the start time tells this process from a later
    one that reuses its pid."""
    stat = _proc_stat(os.getpid())
    return f"{_WORKDIR_PREFIX}{os.getpid()}-{stat[1] if stat else 0}-"


def _owner_gone(pid: int, start: int | None) -> bool:
    """Whether the process that made a workdir has ended. A zombie has: an xdist worker that
    died stays one until the controller reaps it at the end of the session."""
    stat = _proc_stat(pid)
    if stat is None:
        try:  # no /proc entry, or one this user may not read (hidepid): ask the kernel
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return False
    state, started = stat
    return state in ("Z", "X") or (start is not None and started != start)


def sweep_stale_workdirs(parent: str | None = None) -> list[str]:
    """Remove workdirs left by a harness process that has ended (SIGKILLed or ``os._exit``).

    A workdir is named ``qtest-virtio-<pid>-<start time>-<random>`` (before the start time
    was added: ``qtest-virtio-<pid>-<random>``). Its owner has ended when no process has that
    pid, the one that has it is a zombie, or it started at another time (a reused pid). QEMU
    itself died with its parent through PDEATHSIG, only the directory can be left.
    """
    parent = parent or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_WORKDIR_PREFIX):
            continue
        fields = name[len(_WORKDIR_PREFIX) :].split("-")
        if not fields[0].isdigit() or int(fields[0]) == os.getpid():
            continue
        start = int(fields[1]) if len(fields) == 3 and fields[1].isdigit() else None
        if _owner_gone(int(fields[0]), start):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    return removed


def make_workdir() -> str:
    """A fresh 0700 directory for one machine (stale ones are swept first, on this process's
    first start and then every ``SWEEP_INTERVAL`` seconds)."""
    parent = tempfile.gettempdir()
    now = time.monotonic()
    key = (os.getpid(), parent)
    last = _last_sweep.get(key)
    if last is None or now - last >= SWEEP_INTERVAL:
        _last_sweep[key] = now
        sweep_stale_workdirs(parent)
    workdir = tempfile.mkdtemp(prefix=_workdir_prefix())
    os.chmod(workdir, 0o700)  # mkdtemp already makes it 0700; say so explicitly
    return workdir
