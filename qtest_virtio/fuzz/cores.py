"""Where a reused session's processes run: the examples' ping-pong on one core, the rest apart.

An example is a chain of round trips between the fuzzer's thread and the QEMU it drives: each
side sleeps while the other works. On one core a reply hands the core straight over; across two
every wake-up is an inter-processor interrupt and an idle exit, which on a virtual machine costs
tens of microseconds, and the spares' QEMU starts (a core's work for ~30 ms each) land on
whichever core is free, the ping-pong's included. So the session keeps the fuzzer's thread and
the QEMU in use on one core and starts the spares on the others (Linux CPU affinity, which a
child inherits from the thread that spawns it). With fewer than two usable cores nothing moves.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Cores:
    """The core the examples run on and the cores for everything else."""

    examples: frozenset[int]
    others: frozenset[int]

    @classmethod
    def split(cls) -> Cores | None:
        """From this thread's usable cores; None with fewer than two (or no affinity API)."""
        mine = thread_affinity()
        if mine is None or len(mine) < 2:
            return None
        usable = sorted(mine)
        return cls(frozenset(usable[:1]), frozenset(usable[1:]))


def thread_affinity() -> frozenset[int] | None:
    """The calling thread's cores (to put back later), or None without the API."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def pin_thread(cores: frozenset[int]) -> None:
    """Move the calling thread (Linux: pid 0 is the thread, not the whole process)."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, cores)


def pin_process(pid: int, cores: frozenset[int]) -> None:
    """Move every thread of ``pid`` and of its descendants (a wrapper script's QEMU is its
    child; threads made later inherit from their creator). What is gone by then is left alone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.sched_setaffinity(int(tid), cores)
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            pin_process(child, cores)
