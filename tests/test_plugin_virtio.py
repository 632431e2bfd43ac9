# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
# (test functions take pytest fixtures, typed where the fixtures are defined; the rest is strict)
"""The plugin's virtio_device machinery: parametrisation logic (pure), and through pytester:
ids, -k selection, skips decided before QEMU starts, the shared machine, JUnit properties,
--qtest-log, and qtest-virtio run's summary and exit codes."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET

import pytest
from conftest import EXE
from pytest_qtest_virtio.params import virtio_params

from qtest_virtio import modes
from qtest_virtio.app.options import HARNESS_PROPERTIES, OptionError, parse_flags, parse_refuse, parse_transports

pytest_plugins = ["pytester"]
INNER = ["-p", "no:hypothesispytest", "-p", "no:benchmark", "-p", "no:cacheprovider", "-p", "no:xdist"]

RNG_TEST = """
import pytest
pytestmark = pytest.mark.virtio_device("virtio-rng-pci")

@pytest.mark.conformance("rng-demo", spec="5.4.6")
def test_read(virtio_device, qemu):
    assert len(virtio_device.read(16)) == 16
    assert qemu.pid > 0 and virtio_device.dev_id
"""


# -- pure logic -------------------------------------------------------------------------------


def test_parse_options() -> None:
    assert parse_transports(None) == modes.ALL_MODES
    assert parse_transports("all") == modes.ALL_MODES
    assert parse_transports("modern,legacy") == (modes.LEGACY, modes.MODERN)  # design.md's order
    with pytest.raises(OptionError, match="unknown transport mode modrn"):
        parse_transports("modrn")
    assert parse_flags("event_idx=off, packed=on") == {"event_idx": "off", "packed": "on"}
    with pytest.raises(OptionError, match="not PROPERTY=VALUE"):
        parse_flags("event_idx")
    assert parse_refuse("event_idx,INDIRECT_DESC") == {"EVENT_IDX", "INDIRECT_DESC"}


def test_parse_flags_commas_as_qemu_writes_them() -> None:
    assert parse_flags("serial=a,,b, event_idx=off") == {"serial": "a,b", "event_idx": "off"}
    assert parse_flags("serial=,,,,x,,") == {"serial": ",,x,"}
    with pytest.raises(OptionError, match="'b' is not PROPERTY=VALUE"):
        parse_flags("serial=a,b")


@pytest.mark.parametrize("prop", sorted(HARNESS_PROPERTIES))
def test_parse_flags_refuses_what_the_harness_owns(prop: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_flags(f"serial=a,{prop}=x")
    message = str(info.value)
    assert message.startswith(f"--virtio-flags: {prop}=x cannot be set: the ") and "\n" not in message
    if prop.startswith("disable-"):
        assert "the transport mode chooses it" in message and "--virtio-transport" in message
    with pytest.raises(OptionError, match=f"--flags: {prop}=x"):
        parse_flags(f"{prop}=x", option="--flags", transport_option="--transport")


def test_params_modes_rings_and_ids() -> None:
    params = virtio_params(
        "virtio-blk-pci", selected_modes=modes.ALL_MODES, option_flags={}, option_refuse=frozenset(), marker_kwargs={}
    )
    assert [p.id for p in params] == [
        "virtio-blk-pci-legacy",
        "virtio-blk-pci-transitional-legacy",
        "virtio-blk-pci-transitional-modern",
        "virtio-blk-pci-transitional-modern-packed=on",
        "virtio-blk-pci-modern",
        "virtio-blk-pci-modern-packed=on",
    ]
    flagged = virtio_params(
        "virtio-blk-pci",
        selected_modes=(modes.MODERN,),
        option_flags={"event_idx": "off"},
        option_refuse=frozenset({"INDIRECT_DESC"}),
        marker_kwargs={"flags": {"num-queues": 2}, "rings": ("split",)},
    )
    assert [p.id for p in flagged] == ["virtio-blk-pci-modern-event_idx=off-refuse=INDIRECT_DESC"]
    assert flagged[0].flag_dict == {"num-queues": "2", "event_idx": "off"}


def test_packed_option_decides_the_ring_and_skips_legacy() -> None:
    params = virtio_params(
        "virtio-rng-pci",
        selected_modes=modes.ALL_MODES,
        option_flags={"packed": "on"},
        option_refuse=frozenset(),
        marker_kwargs={"transports": ["legacy", "modern"]},
    )
    assert [(p.mode, p.ring, bool(p.skip)) for p in params] == [("legacy", "packed", True), ("modern", "packed", False)]
    assert "needs the modern register layout" in params[0].skip
    split_only = virtio_params(
        "virtio-rng-pci",
        selected_modes=(modes.MODERN,),
        option_flags={"packed": "on"},
        option_refuse=frozenset(),
        marker_kwargs={"rings": ("split",)},
    )
    assert "for split rings only" in split_only[0].skip


# -- through pytester -------------------------------------------------------------------------


@pytest.fixture
def inner(pytester: pytest.Pytester, qemu_binary) -> pytest.Pytester:
    pytester.makepyfile(test_rng=RNG_TEST)
    pytester.makeini("[pytest]\naddopts = --strict-markers\n")
    return pytester


def test_ids_and_selection(inner: pytest.Pytester, qemu_binary) -> None:
    res = inner.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--collect-only", "-q")
    ids = [line for line in res.outlines if "::" in line]
    assert "test_rng.py::test_read[virtio-rng-pci-modern-packed=on]" in ids and len(ids) == 6
    res = inner.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--collect-only", "-q", "-k", "packed=on")
    assert len([line for line in res.outlines if "::" in line]) == 2
    res = inner.runpytest(
        *INNER,
        f"--qemu={qemu_binary.path}",
        "--collect-only",
        "-q",
        "--virtio-flags=event_idx=off",
        "-k",
        "event_idx=off and legacy",
    )
    assert [line for line in res.outlines if "::" in line] == [
        "test_rng.py::test_read[virtio-rng-pci-legacy-event_idx=off]",
        "test_rng.py::test_read[virtio-rng-pci-transitional-legacy-event_idx=off]",
    ]


def test_runs_on_every_mode_with_junit_properties(inner: pytest.Pytester, qemu_binary) -> None:
    res = inner.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--junitxml=out.xml")
    res.assert_outcomes(passed=6)
    tree = ET.parse(inner.path / "out.xml")
    props = [{p.get("name"): p.get("value") for p in case.iter("property")} for case in tree.iter("testcase")]
    assert {p["virtio_transport"] for p in props} == set(modes.ALL_MODES)
    assert all(p["virtio_device"] == "virtio-rng-pci" and p["conformance"] == "rng-demo" for p in props)
    assert {p["virtio_ring"] for p in props} == {"split", "packed"}


def test_unknown_flag_and_bad_options(inner: pytest.Pytester, qemu_binary) -> None:
    res = inner.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--virtio-flags=nosuch=1", "-rs")
    res.assert_outcomes(skipped=6)
    res.stdout.fnmatch_lines(["*has no property 'nosuch'*valid: *event_idx*"])
    res = inner.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--virtio-transport=modrn")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*unknown transport mode modrn*"])
    res = inner.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--virtio-refuse=EVENT_IDXX")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*unknown feature EVENT_IDXX*"])


def test_refuse_and_transport_options(inner: pytest.Pytester, qemu_binary) -> None:
    inner.makepyfile(
        test_refuse="""
import pytest
@pytest.mark.virtio_device("virtio-rng-pci", rings=("split",))
def test_refused(virtio_device):
    assert "EVENT_IDX" not in virtio_device.negotiated
    assert virtio_device.transport.mode == "modern"
"""
    )
    res = inner.runpytest(
        *INNER, f"--qemu={qemu_binary.path}", "test_refuse.py", "--virtio-refuse=EVENT_IDX", "--virtio-transport=modern"
    )
    res.assert_outcomes(passed=1)


BLK_SERIAL_TEST = """
import pytest
@pytest.mark.virtio_device("virtio-blk-pci", transports=("modern",), rings=("split",))
def test_serial(virtio_device):
    assert virtio_device.get_id() == "a,b"
"""


def test_flag_value_with_a_comma_arrives_literally(pytester: pytest.Pytester, qemu_binary) -> None:
    pytester.makepyfile(test_serial=BLK_SERIAL_TEST)
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--virtio-flags=serial=a,,b")
    res.assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("serial=a,id=evil", "--virtio-flags: id=evil cannot be set: the harness names every device it starts"),
        ("netdev=n0", "--virtio-flags: netdev=n0 cannot be set: the harness makes the network backend"),
        ("disable-legacy=on", "the transport mode chooses it (modern: disable-legacy=on); select modes with"),
        ("event_idx=maybe", "--virtio-flags: flag event_idx=maybe: event_idx is a bool property, it takes on or off"),
        ("write-cache=sometimes", "write-cache is a OnOffAuto property, it takes on, off or auto"),
    ],
)
def test_bad_virtio_flags_are_usage_errors(pytester: pytest.Pytester, qemu_binary, flags: str, message: str) -> None:
    pytester.makepyfile(test_serial=BLK_SERIAL_TEST)
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}", f"--virtio-flags={flags}")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in res.errlines if line.strip()]
    assert len(errors) == 1 and message in errors[0], res.errlines
    assert not any("Traceback" in line for line in res.outlines + res.errlines)


def test_unknown_device_in_marker_is_a_collection_error(pytester: pytest.Pytester, qemu_binary) -> None:
    """The test file is wrong whatever the binary: an error at collection, not a skip."""
    pytester.makepyfile(
        test_typo="""
import pytest
@pytest.mark.virtio_device("virtio-blkk-pci")
def test_x(virtio_device):
    pass

def test_other():
    pass
"""
    )
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}")
    assert res.ret == pytest.ExitCode.INTERRUPTED  # collection errors stop the session, as pytest does
    res.assert_outcomes(errors=1)
    res.stdout.fnmatch_lines(
        ["*test_typo.py::test_x: @pytest.mark.virtio_device('virtio-blkk-pci') names no device qtest-virtio drives; "
         "did you mean 'virtio-blk-pci'?*"]
    )  # fmt: skip
    assert "skipped" not in res.stdout.str() and "Traceback" not in res.stdout.str()


def test_missing_marker_is_a_usage_error(pytester: pytest.Pytester, qemu_binary) -> None:
    pytester.makepyfile("def test_x(virtio_device):\n    pass\n")
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}")
    assert res.ret != 0
    assert "without @pytest.mark.virtio_device" in res.stdout.str() + res.stderr.str()


def test_virtio_requires_skips_with_reason(pytester: pytest.Pytester, qemu_binary) -> None:
    pytester.makepyfile(
        """
import pytest
pytestmark = [pytest.mark.virtio_device("virtio-rng-pci", rings=("split",), flags={"queue_reset": "off"}),
              pytest.mark.virtio_requires("RING_RESET")]
def test_reset(virtio_device):
    pass
"""
    )
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}", "-rs")
    res.assert_outcomes(skipped=4)
    res.stdout.fnmatch_lines(["*does not offer RING_RESET*"])


def test_qtest_log_per_test(inner: pytest.Pytester, qemu_binary) -> None:
    res = inner.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--qtest-log=logs", "-k", "modern and not packed")
    res.assert_outcomes(passed=2)
    logs = sorted(os.listdir(inner.path / "logs"))
    assert len(logs) == 2 and all(name.endswith(".qtest.log") for name in logs)
    text = (inner.path / "logs" / logs[0]).read_text()
    assert "> endianness" in text and "< OK little" in text and "b64read" in text


# -- qtest-virtio run -------------------------------------------------------------------------


@pytest.mark.skipif(EXE is None, reason="qtest-virtio console script not installed")
def test_run_prints_summary_and_exit_codes(inner: pytest.Pytester, qemu_binary) -> None:
    assert EXE
    path = str(inner.path / "test_rng.py")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [EXE, "run", path, "--qemu", qemu_binary.path, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=inner.path,
            check=False,
        )

    ok = run("-n", "1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "virtio-rng-pci         modern               packed=on" in ok.stdout
    assert "total" in ok.stdout
    assert run("--flags", "evnt_idx=off").returncode == 128  # a typo aborts a bisect
    assert run("--transport", "modrn").returncode == 128
    skipped = run("--flags", "packed=on", "--transport", "legacy", "-n", "1")
    assert skipped.returncode == 125  # nothing could run with this binary
    failing = inner.makepyfile(
        test_fail="""
import pytest
@pytest.mark.virtio_device("virtio-rng-pci", transports=["modern"], rings=("split",))
def test_fails(virtio_device):
    assert virtio_device.read(4) == b"nope"
"""
    )
    res = subprocess.run(
        [EXE, "run", str(failing), "--qemu", qemu_binary.path, "-n", "1"],
        capture_output=True, text=True, timeout=120, cwd=inner.path, check=False,
    )  # fmt: skip
    assert res.returncode == 1


def test_refuse_each_and_ini_options(pytester: pytest.Pytester, qemu_binary) -> None:
    """--virtio-refuse-each adds one run per driver feature; the virtio_* ini keys act like options."""
    pytester.makepyfile(test_rng=RNG_TEST)
    pytester.makeini(
        f"[pytest]\nqemu = {qemu_binary.path}\nvirtio_transport = modern\nvirtio_flags = event_idx=off\n"
        "virtio_refuse = INDIRECT_DESC\n"
    )
    res = pytester.runpytest(*INNER, "--collect-only", "-q")
    ids = [line for line in res.outlines if "::" in line]
    assert ids == [
        "test_rng.py::test_read[virtio-rng-pci-modern-event_idx=off-refuse=INDIRECT_DESC]",
        "test_rng.py::test_read[virtio-rng-pci-modern-event_idx=off-packed=on-refuse=INDIRECT_DESC]",
    ]
    res = pytester.runpytest(*INNER, "--virtio-refuse-each", "-v")
    # EVENT_IDX, RING_PACKED, RING_RESET, ANY_LAYOUT, IN_ORDER; INDIRECT_DESC is refused already
    res.assert_outcomes(passed=2 + 5)
    res.stdout.fnmatch_lines(["*refuse=EVENT_IDX+INDIRECT_DESC*PASSED*"])


def test_marker_narrows_refuse_each(pytester: pytest.Pytester, qemu_binary) -> None:
    """virtio_device(refuse_each=False) keeps a scenario out of the refusal runs, a list keeps
    only those refusals; a name the driver cannot refuse is a usage error naming the valid ones."""
    pytester.makepyfile(
        test_narrow="""
import pytest

@pytest.mark.virtio_device("virtio-rng-pci", transports="modern", rings=("split",), refuse_each=False)
def test_none(virtio_device):
    assert virtio_device.read(4)

@pytest.mark.virtio_device("virtio-rng-pci", transports="modern", rings=("split",), refuse_each=["EVENT_IDX"])
def test_one(virtio_device):
    assert virtio_device.read(4)
"""
    )
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--virtio-refuse-each", "--collect-only", "-q")
    ids = [line for line in res.outlines if "::" in line]
    assert ids == [
        "test_narrow.py::test_none[virtio-rng-pci-modern]",
        "test_narrow.py::test_one[virtio-rng-pci-modern]",
        "test_narrow.py::test_one[virtio-rng-pci-modern-refuse=EVENT_IDX]",
    ]
    pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.virtio_device("virtio-rng-pci", refuse_each=["EVENT_IDXX"])
def test_bad(virtio_device):
    pass
"""
    )
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}", "--virtio-refuse-each", "test_bad.py")
    assert res.ret != 0
    res.stdout.fnmatch_lines(["*refuse_each=...): EVENT_IDXX is no feature this driver can refuse; valid: *EVENT_IDX*"])


def test_marker_passes_driver_options_to_the_driver(pytester: pytest.Pytester, qemu_binary) -> None:
    """A marker keyword the device's driver takes (its constructor's, or a base's) goes to the
    driver; the rest go to the machine spec (backend=, image_size=)."""
    pytester.makepyfile(
        test_opts="""
import pytest

@pytest.mark.virtio_device("virtio-serial-pci", transports="modern", rings=("split",), nr_ports=2, open_ports=False)
def test_serial(virtio_device):
    assert virtio_device.nr_ports == 2

@pytest.mark.virtio_device("virtio-blk-pci", transports="modern", rings=("split",), queue_size=8, image_size=1 << 20)
def test_blk(virtio_device):
    assert virtio_device.queues[0].size == 8
    assert virtio_device.capacity == (1 << 20) // 512
"""
    )
    res = pytester.runpytest(*INNER, f"--qemu={qemu_binary.path}")
    res.assert_outcomes(passed=2)
