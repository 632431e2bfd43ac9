"""/proc helpers the process-lifetime tests share (is a QEMU really gone, or a zombie?)."""

from __future__ import annotations

from pathlib import Path


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: tells a process from a later one that reuses its pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text[text.rindex(")") + 2 :].split()[19])


def state(pid: int) -> str:
    """The State: line of /proc/PID/status ('Z (zombie)', 'S (sleeping)', ...), or 'gone'."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split(None, 1)[1]
    except OSError:
        pass
    return "gone"
