"""Send groups of the ``.qtest`` plain form (design.md, "Reproducer format"): the commands one
write to QEMU carried, between a ``# qtest-virtio: group`` line and a ``# qtest-virtio: end``
line. :mod:`.reproducer` parses and replays them; the fuzzer writes them (:mod:`.fuzz.corpus`).

Why they exist: QEMU's qtest server takes up to 1 KiB of input per main-loop pass
(``qtest_can_read`` in system/qtest.c), so commands that arrive in one write run back to back,
with no bottom half or eventfd handler of a device in between; sent one at a time, each waiting
for its reply, they do not. A find that depends on that only replays as it was sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

#: The directive names (``# qtest-virtio: NAME``) that open and close a group.
OPEN = "group"
CLOSE = "end"
OPEN_LINE = f"# qtest-virtio: {OPEN}"
CLOSE_LINE = f"# qtest-virtio: {CLOSE}"

#: A group as indices into a list of command lines: ``[start, stop)``.
Span = tuple[int, int]


def spans_of_sends(sends: Iterable[bytes]) -> list[Span]:
    """The groups of a recording that holds one ``bytes`` per send (``QtestClient.record``):
    the lines whose newline a send carried, where it carried more than one. A line cut across
    two sends belongs to the one that completed it, since QEMU runs a line only when it is whole."""
    spans: list[Span] = []
    done = 0
    for data in sends:
        lines = data.count(b"\n")
        if lines > 1:
            spans.append((done, done + lines))
        done += lines
    return spans


def with_groups(commands: Sequence[str], spans: Iterable[Span]) -> list[str]:
    """``commands`` with the marker lines around each group (spans in order, not overlapping,
    each clipped to ``commands``; one that is left with fewer than two lines is no group)."""
    out: list[str] = []
    at = 0
    for start, stop in sorted(spans):
        start, stop = max(start, at), min(stop, len(commands))
        if stop - start < 2:
            continue
        out += [*commands[at:start], OPEN_LINE, *commands[start:stop], CLOSE_LINE]
        at = stop
    return out + list(commands[at:])
