"""What the fuzzer notes about QEMU without failing it: observations, and the errors QEMU
prints (virtio_error and friends), each with whether the device shows DEVICE_NEEDS_RESET."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..machine import is_crash_marker
from ..transport.layout import STATUS
from ..vm import Machine
from .actions import Action, Target


@dataclass(frozen=True)
class Observation:
    """Something QEMU did that the spec does not allow or that is worth knowing, not a failure."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def normal(exc: BaseException | str) -> str:
    """A message with numbers and the transport's name taken out, so observations group."""
    text = str(exc).split("\n")[0]
    text = re.sub(r"^<[^>]*>: ", "", text)
    text = re.sub(r"0x[0-9a-f]+|\b\d+\b", "N", text)
    return text[:100]


def observe_errors(vm: Machine, driver: Any, target: Target, action: Action, seen: int, out: list[Observation]) -> int:
    """Errors QEMU printed since line ``seen`` (virtio_error and friends), each with whether
    the device then shows DEVICE_NEEDS_RESET (§2.1.2: it should, in the modern layout)."""
    lines = vm.stderr_text().splitlines()
    new = [line for line in lines[seen:] if line.strip() and not is_crash_marker(line)]
    if new:
        needs_reset = bool(driver.transport.get_status() & STATUS.DEVICE_NEEDS_RESET.mask)
        for line in new:
            what = normal(line.split(": ", 1)[-1] if line.startswith("qemu-system") else line)
            if target.legacy:
                kind = "error reported (legacy layout, no DEVICE_NEEDS_RESET there)"
            elif action.may_write_status():
                kind = "error reported (status rewritten by the same action: not checked)"
            elif needs_reset:
                kind = "error reported, DEVICE_NEEDS_RESET set"
            else:
                kind = "error reported WITHOUT DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2)"
            out.append(Observation(kind, what))
    return len(lines)
