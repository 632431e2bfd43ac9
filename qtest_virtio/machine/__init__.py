"""The machine layer: a QEMU process in qtest mode, started from a spec.

- spec.py: what to start (MachineSpec, DeviceSpec) and QEMU's ``key=value,...`` option syntax;
- launch.py: the argv and backends for a spec (LaunchPlan, build_argv, the halt firmware);
- process.py: spawning, stopping and reaping QEMU, accepting its sockets, the QMP client;
- machine.py: QemuMachine, which ties them together and reports crashes.

QEMU connects, as a client, to two Unix sockets the harness listens on in a fresh 0700
directory (the layout libqtest uses): one for qtest, one for QMP.
"""

from .launch import LaunchPlan, build_argv, halt_firmware, names_qtest_accel
from .machine import QemuMachine, watch_machines
from .process import CRASH_MARKERS, is_crash_marker
from .spec import DeviceSpec, MachineSpec, PropValue, escape_option_value, format_value, parse_memory, split_option_list

__all__ = [
    "CRASH_MARKERS",
    "DeviceSpec",
    "LaunchPlan",
    "MachineSpec",
    "PropValue",
    "QemuMachine",
    "build_argv",
    "escape_option_value",
    "format_value",
    "halt_firmware",
    "is_crash_marker",
    "names_qtest_accel",
    "parse_memory",
    "split_option_list",
    "watch_machines",
]
