"""The qtest layer: the command grammar (:mod:`.grammar`) and the client that speaks it over
the machine's socket (:mod:`.client`)."""

from __future__ import annotations

from .batch import CommandBatch
from .client import READ_CHUNK, WRITE_CHUNK, DeadHook, QtestClient
from .grammar import (
    COMMANDS,
    GRAMMAR,
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    INT64_MIN,
    MAX_LINE,
    U8,
    U16,
    U32,
    U64,
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
    "INT32_MAX",
    "INT32_MIN",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_LINE",
    "READ_CHUNK",
    "U8",
    "U16",
    "U32",
    "U64",
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
