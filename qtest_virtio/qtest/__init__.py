"""The qtest layer: the command grammar (:mod:`.grammar`) and the client that speaks it over
the machine's socket (:mod:`.client`)."""

from __future__ import annotations

from .client import READ_CHUNK, WRITE_CHUNK, CommandBatch, DeadHook, QtestClient
from .grammar import (
    COMMANDS,
    GRAMMAR,
    MAX_LINE,
    Arg,
    ArgKind,
    Command,
    CommandSpec,
    Reply,
    Space,
    access,
    check_int,
    check_raw,
    check_span,
)

__all__ = [
    "COMMANDS",
    "GRAMMAR",
    "MAX_LINE",
    "READ_CHUNK",
    "WRITE_CHUNK",
    "Arg",
    "ArgKind",
    "Command",
    "CommandBatch",
    "CommandSpec",
    "DeadHook",
    "QtestClient",
    "Reply",
    "Space",
    "access",
    "check_int",
    "check_raw",
    "check_span",
]
