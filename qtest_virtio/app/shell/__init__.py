"""``qtest-virtio shell`` (moved into a package; split into its modules next)."""

from .commands import Shell, ShellError, _raw_table, add_arguments, hexdump, main, parse_int, parse_raw, run_shell

__all__ = [
    "Shell",
    "ShellError",
    "_raw_table",
    "add_arguments",
    "hexdump",
    "main",
    "parse_int",
    "parse_raw",
    "run_shell",
]
