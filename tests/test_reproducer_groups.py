"""Send groups in ``.qtest`` reproducers (issue 16): ``# qtest-virtio: group`` ... ``end`` holds
the commands one write to QEMU carried. The grammar (parse, render, round trip, malformed files
with file and line) is checked directly; that replay sends each group in one write, and that the
fuzzer writes the groups its sends made, on real QEMU through the recording socket."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import EXE

from qtest_virtio import ScenarioError
from qtest_virtio.binary import QemuBinary
from qtest_virtio.fuzz import FuzzConfig, Valid, run_example
from qtest_virtio.fuzz.corpus import reproducer_text
from qtest_virtio.groups import CLOSE_LINE, OPEN_LINE, spans_of_sends, with_groups
from qtest_virtio.machine import MachineSpec, QemuMachine
from qtest_virtio.outcome import Judge, Outcome
from qtest_virtio.reproducer import (
    Group,
    ReplayResult,
    load,
    normalize_args,
    parse,
    replay,
    run_commands,
    upstream_command,
)

HEADER = "# qemu-args: -M q35 -nodefaults\n"
GROUPED = (
    HEADER
    + "writel 0x100000 0x1\n"
    + "# qtest-virtio: group\n"
    + "writel 0x100004 0x2\n"
    + "# a comment inside a group is a comment\n"
    + "readl 0x100000\n"
    + "# qtest-virtio: end\n"
    + "readl 0x100004\n"
    + "# qtest-virtio:   group  \n"
    + "writeb 0x100008 0x3\n"
    + "readb 0x100008\n"
    + "readw 0x100008\n"
    + "# qtest-virtio: end\n"
)
COMMANDS = [
    "writel 0x100000 0x1",
    "writel 0x100004 0x2",
    "readl 0x100000",
    "readl 0x100004",
    "writeb 0x100008 0x3",
    "readb 0x100008",
    "readw 0x100008",
]


def test_groups_parse_with_their_lines_and_commands() -> None:
    rep = parse(GROUPED, "g.qtest")
    assert [c for _, c in rep.commands] == COMMANDS
    assert rep.groups == [Group(3, 1, 3), Group(9, 4, 7)]
    assert rep.directives == []
    assert "a comment inside a group is a comment" in rep.comments


def test_groups_render_and_round_trip() -> None:
    spans = [(1, 3), (4, 7)]
    lines = with_groups(COMMANDS, spans)
    assert lines[:5] == ["writel 0x100000 0x1", OPEN_LINE, "writel 0x100004 0x2", "readl 0x100000", CLOSE_LINE]
    assert lines.count(OPEN_LINE) == lines.count(CLOSE_LINE) == 2
    rep = parse(HEADER + "\n".join(lines) + "\n", "r.qtest")
    assert [c for _, c in rep.commands] == COMMANDS
    assert [(g.start, g.stop) for g in rep.groups] == spans
    # clipped to the commands; what is left with fewer than two lines is no group
    assert with_groups(COMMANDS[:2], [(1, 3)]) == COMMANDS[:2]
    assert with_groups(COMMANDS, [(0, 1)]) == COMMANDS


def test_spans_of_sends_count_the_lines_each_send_completed() -> None:
    sends = [b"outl 0xcf8 0x80000000\n", b"inl 0xcfc\nreadl 0x0\n", b"b64write 0x0 0x4 AAA", b"AAA==\nreadb 0x0\n"]
    # the b64write cut across two sends belongs to the one that completed it (QEMU runs whole lines)
    assert spans_of_sends(sends) == [(1, 3), (3, 5)]
    assert spans_of_sends([b"a\n", b"b\n"]) == []


def test_upstream_form_has_a_groups_lines_in_order() -> None:
    text = upstream_command(parse(GROUPED, "g.qtest"))
    assert text.splitlines()[1:-1] == COMMANDS
    assert "qtest-virtio" not in text


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [
        ("# qtest-virtio: group\nreadl 0x0\n", 2, "the group opened here never ends with '# qtest-virtio: end'"),
        ("readl 0x0\n# qtest-virtio: end\n", 3, "'# qtest-virtio: end' with no group open"),
        ("# qtest-virtio: group\n# qtest-virtio: end\nreadl 0x0\n", 3, "holds no command"),
        (
            "# qtest-virtio: group\nreadl 0x0\n# qtest-virtio: group\nreadl 0x0\n# qtest-virtio: end\n",
            4,
            "groups do not nest",
        ),
        ("# qtest-virtio: group 3\nreadl 0x0\n# qtest-virtio: end\n", 2, "group takes no arguments"),
        (
            "# qtest-virtio: group\nreadl 0x0\n# qtest-virtio: migrate\n# qtest-virtio: end\n",
            4,
            "inside the group opened at line 2",
        ),
    ],
)
def test_malformed_groups_name_file_and_line(body: str, line: int, message: str) -> None:
    with pytest.raises(ScenarioError, match=rf"^bad\.qtest:{line}: .*{message}"):
        parse(HEADER + body, "bad.qtest")


def test_groups_belong_to_the_plain_form() -> None:
    text = "qemu-system-x86_64 -M q35 -qtest stdio\nwritel 0x100000 0x1\n# qtest-virtio: group\nreadl 0x100000\n"
    with pytest.raises(ScenarioError, match=r"x\.qtest:3: .* in a stdio reproducer: groups .* plain form"):
        parse(text, "x.qtest")


def test_a_grouped_replay_sends_each_group_in_one_write(qemu_binary: QemuBinary) -> None:
    """The recording socket holds one item per write: each group is one, every other command
    one of its own, in file order; the replies are QEMU's (the group's writes landed)."""
    rep = parse(GROUPED, "g.qtest")
    args, _ = normalize_args(rep.args, qemu_binary)
    vm = QemuMachine(MachineSpec(qemu=qemu_binary.path, raw_args=args))
    vm.start()
    try:
        sends = vm.qtest.record()
        lines: list[str] = []
        result = ReplayResult(Outcome.SURVIVED)
        judge = Judge(vm, hung=str)
        with judge as verdict:
            run_commands(judge, vm, rep, result, trace=True, echo=lines.append)
        assert verdict.outcome is Outcome.SURVIVED
        written = [s.decode("ascii").splitlines() for s in sends]
        assert written == [COMMANDS[:1], COMMANDS[1:3], COMMANDS[3:4], COMMANDS[4:7], ["endianness"]]
        assert result.commands_run == len(COMMANDS)
        assert lines[2].endswith("readl 0x100000  ->  OK 0x0000000000000001")
        assert lines[6].endswith("readw 0x100008  ->  OK 0x0000000000000003")
    finally:
        vm.shutdown(check=False)


def test_grouped_file_replays_through_the_cli(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    path = tmp_path / "g.qtest"
    path.write_text(GROUPED)
    assert EXE
    res = subprocess.run([EXE, "replay", str(path), "--qemu", qemu_binary.path], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"survived: {len(COMMANDS)} commands replayed" in res.stdout


def test_the_fuzzer_writes_its_sends_as_groups(tmp_path: Path, qemu_binary: QemuBinary) -> None:
    """A valid request through the driver posts its ring writes and sends them with the next
    read in one write: the find's .qtest has those lines in a group, and replay sends them so."""
    result = run_example(FuzzConfig("virtio-rng-pci", "modern", "split", qemu=qemu_binary.path), [Valid()])
    assert result.outcome is Outcome.SURVIVED and result.groups
    assert all(stop - start > 1 for start, stop in result.groups)
    text = reproducer_text(result)
    path = tmp_path / "rng.qtest"
    path.write_text(text)
    rep = load(str(path))
    assert [c for _, c in rep.commands] == result.commands
    assert [(g.start, g.stop) for g in rep.groups] == result.groups
    assert text.count(OPEN_LINE) == len(result.groups)
    assert replay(rep, qemu=qemu_binary.path, settle_s=0.1).outcome is Outcome.SURVIVED
