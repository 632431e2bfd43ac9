"""nox sessions (design.md): tests, lint, typecheck, bench; suite and flags(...) come later.

Every session gets its own virtualenv, reused between runs, with the project installed editable
with its ``dev`` extras. Extra arguments go after ``--`` (``nox -s tests -- --qemu build/qemu-system-x86_64``).
The ``QEMU`` environment variable reaches every command, because nox passes the caller's environment.
"""

from __future__ import annotations

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint", "typecheck"]

LINT_PATHS = ["qtest_virtio", "plugins", "tests", "benchmarks", "noxfile.py"]


def install(session: nox.Session) -> None:
    session.install("-e", ".[dev]")


@nox.session
def tests(session: nox.Session) -> None:
    """The README's test command, python -m pytest (posargs go to pytest, e.g. --qemu PATH)."""
    install(session)
    session.run("python", "-m", "pytest", *session.posargs)


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
    """python benchmarks/bench_qtest.py (posargs go to it, e.g. --qemu PATH --json out.json)."""
    install(session)
    session.run("python", "benchmarks/bench_qtest.py", *session.posargs)


# -- scenario sessions (not yet written) ------------------------------------------------------
# design.md adds here:
#   suite            scenarios/ against the installed QEMU (posargs to pytest, --qemu passes through)
#   flags(...)       one session per feature-flag value, tagged "flags" (`nox -l` lists
#                    flags(event_idx=off), ...; `nox -t flags` runs them all), each running the
#                    suite with --virtio-flags K=V
# They need the scenarios and the plugin's --virtio-flags option, which do not exist yet.
