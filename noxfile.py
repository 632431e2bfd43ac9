"""nox sessions (design.md): tests, suite, flags(...), lint, typecheck, bench, coverage; and fuzz (issue 7).

Every session gets its own virtualenv, reused between runs, with the project installed editable
with its ``dev`` extras. Extra arguments go after ``--`` (``nox -s tests -- --qemu build/qemu-system-x86_64``).
The ``QEMU`` environment variable reaches every command, because nox passes the caller's environment.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck"]

LINT_PATHS = ["qtest_virtio", "plugins", "tests", "benchmarks", "noxfile.py"]


def install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The README's test command, python -m pytest -n 2 (posargs go to pytest, e.g. --qemu PATH)."""
    install(session)
    session.run("python", "-m", "pytest", "-n", "2", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    install(session)
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy with the configuration in pyproject.toml."""
    install(session)
    session.run("mypy", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmarks in interleaved rounds (benchmarks/README.md): qtest client, virtqueues, suite
    cost. Opt-in (not a default session, not in CI). Each writes bench-results-NAME.json and the
    README's table is printed from them. posargs go to each (e.g. --qemu PATH --rounds 9)."""
    install(session)
    results = []
    for name in ("qtest", "virtqueue", "suite"):
        out = f"bench-results-{name}.json"
        session.run("python", os.path.join("benchmarks", f"bench_{name}.py"), "--json", out, *session.posargs)
        results.append(out)
    session.run("python", os.path.join("benchmarks", "table.py"), *results)


@nox.session
def fuzz(session: nox.Session) -> None:
    """A hostile-driver campaign: ``qtest-virtio fuzz --keep-going`` (posargs go to it, e.g.
    ``-- --device virtio-net-pci --seconds 600 --qemu build/qemu-system-x86_64``)."""
    install(session)
    args = session.posargs or ["--seconds", "600"]
    session.run("qtest-virtio", "fuzz", "--keep-going", *args)


# -- the scenario suite, once per feature flag ---------------------------------------------------

#: One table: every session in `nox -t flags` comes from here (design.md, issue 5). Device-side flags
#: are QEMU properties of every virtio-pci device; each value a QEMU developer may want to rule in or
#: out gets a session. Driver-side refusals are features the driver declines even when offered.
DEVICE_FLAGS: dict[str, tuple[str, ...]] = {
    "event_idx": ("on", "off"),
    "indirect_desc": ("on", "off"),
    "packed": ("on", "off"),
    "queue_reset": ("on", "off"),
    "any_layout": ("on", "off"),
    "notify_on_empty": ("on", "off"),
    "page-per-vq": ("on", "off"),
    "modern-pio-notify": ("on", "off"),
    "ioeventfd": ("on", "off"),
    "use-disabled-flag": ("on", "off"),
    # VIRTIO_F_IN_ORDER: QEMU 10.0 and later (default off); a binary without it cannot run these.
    "in_order": ("on", "off"),
}
DRIVER_REFUSALS = ("EVENT_IDX", "INDIRECT_DESC", "RING_PACKED", "RING_RESET", "IN_ORDER")
FLAG_SESSIONS = [f"{k}={v}" for k, values in DEVICE_FLAGS.items() for v in values] + [
    f"refuse={f}" for f in DRIVER_REFUSALS
]
SHARED_VENV = os.path.join(".nox", "_shared")


def shared_python(session: nox.Session) -> str:
    """One virtualenv for the suite and every flags session: installed once (again only when
    pyproject.toml changes), so a flag session costs the suite's time, not an install."""
    python = os.path.join(SHARED_VENV, "bin", "python")
    stamp = os.path.join(SHARED_VENV, "pyproject.sha256")
    with open("pyproject.toml", "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    current = ""
    if os.path.exists(stamp):
        with open(stamp) as f:
            current = f.read()
    if not os.path.exists(python):
        session.run(sys.executable, "-m", "venv", SHARED_VENV, external=True)
    if current != digest:
        session.run(python, "-m", "pip", "install", "--quiet", "-e", ".[dev]", external=True)
        with open(stamp, "w") as f:
            f.write(digest)
    return python


def qemu_args(session: nox.Session) -> tuple[list[str], list[str]]:
    """Split posargs into --qemu PATH (for qtest-virtio run) and the rest (for pytest)."""
    args, qemu = list(session.posargs), []
    if "--qemu" in args:
        i = args.index("--qemu")
        qemu, args = ["--qemu", args[i + 1]], args[:i] + args[i + 2 :]
    for a in list(args):
        if a.startswith("--qemu="):
            qemu, args = ["--qemu", a.split("=", 1)[1]], [x for x in args if x != a]
    return qemu, args


def run_suite(session: nox.Session, *extra: str) -> None:
    python = shared_python(session)
    qemu, pytest_args = qemu_args(session)
    cmd = [python, "-m", "qtest_virtio.app.cli", "run", *qemu, *extra]
    if pytest_args:
        cmd += ["--", *pytest_args]
    session.run(*cmd, external=True)


@nox.session(venv_backend="none")
def suite(session: nox.Session) -> None:
    """The scenario suite against the installed QEMU (QEMU from --qemu PATH in posargs or $QEMU)."""
    run_suite(session)


@nox.session(venv_backend="none")
def coverage(session: nox.Session) -> None:
    """The suite on a gcov build of QEMU and what it executed there: per-file lines and branches of
    the virtio core and device files, gcovr's HTML report in coverage-html/ (issue 14).

    Builds (about 7 minutes) or reuses the cached gcov build of 10.0.2 (scripts/qemu.sh); with
    ``-- --coverage-build DIR`` it measures your own tree instead. Other posargs go to
    ``qtest-virtio run``: targets, ``--coverage-file hw/virtio/virtio-mem.c``, ``--coverage-html DIR``.
    """
    python = shared_python(session)
    args = list(session.posargs)
    if not any(a == "--coverage-build" or a.startswith("--coverage-build=") for a in args):
        found = subprocess.run(
            ["bash", "scripts/qemu.sh", "path", "gcov-10.0.2"], stdout=subprocess.PIPE, text=True, check=False
        )
        if found.returncode != 0 or not found.stdout.strip():
            session.error("the gcov build of 10.0.2 could not be provided (scripts/qemu.sh said why above)")
        args = ["--coverage-build", os.path.dirname(found.stdout.strip().splitlines()[-1]), *args]
    if not any(a == "--coverage-html" or a.startswith("--coverage-html=") for a in args):
        args += ["--coverage-html", "coverage-html"]
    session.run(python, "-m", "qtest_virtio.app.cli", "run", *args, external=True)


@nox.session(venv_backend="none", tags=["flags"])
@nox.parametrize("flag", FLAG_SESSIONS, ids=FLAG_SESSIONS)
def flags(session: nox.Session, flag: str) -> None:
    """The suite with one feature flag set: `nox -s "flags(packed=on)" -- -k blk`."""
    key, _, value = flag.partition("=")
    if key == "refuse":
        run_suite(session, "--refuse", value)
    else:
        run_suite(session, "--flags", flag)
