"""The fuzzer's finds as ``.qtest`` files: writing a reproducer (plain form, with the headers a
campaign and replay read back), the known bugs of a reproducer folder (``--known``), and the
recovery check a ``# fuzz-check:`` header asks a replay for.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import modes
from ..deviations import Deviation
from ..deviations import table as deviation_table
from ..errors import ScenarioError
from ..groups import with_groups
from ..outcome import Outcome
from ..vm import Machine
from .engine import ExampleResult, FuzzConfig, driver_for, machine_for, signature
from .targets import DEVICE_ID, DEVICES

#: A comment (``#`` stripped) that makes a fuzzer reproducer end with a recovery check.
FUZZ_CHECK = "fuzz-check:"
SIGNATURE_HEADER = "# fuzz-signature:"


def reproducer_text(result: ExampleResult, *, seed: int | None = None) -> str:
    """The plain ``.qtest`` form: ``# qemu-args:`` then every command QEMU received, the lines
    one send carried inside a send group (``# qtest-virtio: group`` ... ``end``, :mod:`..groups`),
    so replay sends them as QEMU got them."""
    c = result.config
    commands = result.commands
    check: list[str] = []
    if result.outcome is Outcome.UNRECOVERED and result.recovery_from is not None:
        # QEMU lived: the failure is in the recovery, which replay re-runs from this header.
        commands = commands[: result.recovery_from]
        slot = " unplug=1" if c.unplug else ""  # the machine has the device in a hot-plug slot
        check = [f"# {FUZZ_CHECK} device={c.device} mode={c.mode} ring={c.ring} queue={c.queue_index}{slot}"]
    lines = [
        f"# qtest-virtio fuzz: {c.device} mode={c.mode} ring={c.ring}" + (f" seed={seed}" if seed is not None else ""),
        f"# outcome: {result.outcome}: {result.detail.splitlines()[0] if result.detail else ''}",
        f"{SIGNATURE_HEADER} {signature(result)}",
        "# hostile actions (after the driver's initialization to DRIVER_OK):",
        *(f"#   {a!r}" for a in result.actions),
        *check,
        f"# qemu-args: {shlex.join(result.args)}",
        *with_groups(commands, result.groups),
    ]
    return "\n".join(lines) + "\n"


def known_signatures(
    directory: str, version: tuple[int, int, int], deviations: Mapping[str, Deviation] | None = None
) -> dict[str, str]:
    """Signatures of the known bugs in a reproducer directory -> path: the ``# fuzz-signature:``
    of each ``.qtest`` whose file stem is an entry of the deviation table that is live on
    ``version`` (verified there, or unverified in between; not fixed). A campaign or a smoke
    test passes them as ``known`` so a known bug is not reported anew."""
    table = deviations if deviations is not None else deviation_table()
    out: dict[str, str] = {}
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".qtest"):
            continue
        entry = table.get(name[: -len(".qtest")])
        if entry is None or not entry.status(version).live:
            continue
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8") as f:
            comments = [line.strip().lstrip("# ") for line in f if line.startswith("#")]
        sig = comment_value(comments, SIGNATURE_HEADER)
        if sig:
            out[sig] = path
    return out


def comment_value(comments: Sequence[str], header: str) -> str | None:
    """The value of the first ``# name: value`` header among a reproducer's comments (their
    text without the ``#``, as ``Reproducer.comments`` holds them)."""
    prefix = header.lstrip("# ")
    return next((c[len(prefix) :].strip() for c in comments if c.startswith(prefix)), None)


def write_reproducer(result: ExampleResult, out_dir: str, *, seed: int | None = None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    c = result.config
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = os.path.join(out_dir, f"{c.name}-{result.outcome}-{stamp}")
    path, n = f"{stem}.qtest", 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}.qtest"
    with open(path, "w", encoding="utf-8") as f:
        f.write(reproducer_text(result, seed=seed))
    return path


@dataclass(frozen=True)
class RecoveryCheck:
    """What a ``# fuzz-check:`` header asks a replay for: the example's machine, rebuilt, and
    after the commands a fresh driver (device reset, initialization) serving the device's valid
    request (the runner's recovery, so replay classifies the find as the fuzzer did)."""

    config: FuzzConfig

    def machine(self) -> Machine:
        return machine_for(self.config)

    def run(self, vm: Machine) -> None:
        """QtestVirtioError when the device does not serve the valid request (plugged again
        first when the commands unplugged it, as the example's recovery did)."""
        if self.config.unplug and vm.pci_address(DEVICE_ID) is None:
            vm.plug(DEVICE_ID)
        driver = driver_for(vm, self.config)  # enumeration re-assigns the BARs; initialization resets
        DEVICES[self.config.device].check(vm, driver, 5.0)


def recovery_check(comments: Sequence[str], *, qemu: str, timeout: float, path: str) -> RecoveryCheck | None:
    """The recovery check a reproducer's ``# fuzz-check:`` line asks for (None without one), on
    ``qemu`` with ``timeout`` as the hang bound; ScenarioError naming the file when it is malformed."""
    line = next((c for c in comments if c.startswith(FUZZ_CHECK)), None)
    if line is None:
        return None
    fields = dict(word.partition("=")[::2] for word in line[len(FUZZ_CHECK) :].split())
    try:
        config = FuzzConfig(
            fields["device"],
            modes.check_mode(fields["mode"]),
            fields["ring"],
            qemu,
            queue=int(fields["queue"]),
            hang_timeout=timeout,
            unplug=fields.get("unplug", "0") == "1",
        )
        _ = DEVICES[config.device]  # a KeyError names a device without a fuzz profile
    except (KeyError, ValueError) as exc:
        raise ScenarioError(f"malformed '# {FUZZ_CHECK}' line ({exc}): {line}", path=path) from None
    return RecoveryCheck(config)
