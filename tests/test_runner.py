# mypy: allow-untyped-defs, allow-incomplete-defs, allow-untyped-calls
"""qtest-virtio run's pytest arguments (qtest_virtio/app/runner.py): plugins the suite does not use
are blocked, unless the arguments use them."""

from __future__ import annotations

import pytest

from qtest_virtio.app.runner import pytest_args_for_run, run_pytest


def test_unused_plugins_are_blocked_unless_asked_for() -> None:
    assert pytest_args_for_run(["scenarios", "-q"]) == ["scenarios", "-q", "-p", "no:hypothesispytest"]
    kept = ["scenarios", "--hypothesis-seed=3"]
    assert pytest_args_for_run(kept) == kept
    enabled = ["scenarios", "-p", "hypothesispytest"]
    assert pytest_args_for_run(enabled) == enabled


PLUGIN_CHECK = """
def test_plugins(request):
    assert not request.config.pluginmanager.has_plugin("hypothesispytest")
"""


def test_run_pytest_runs_without_the_hypothesis_plugin(pytester: pytest.Pytester) -> None:
    pytest.importorskip("hypothesis", reason="the check needs hypothesis installed (its plugin then loads)")
    pytester.makepyfile(test_check=PLUGIN_CHECK)
    code, collector = run_pytest([str(pytester.path), "-p", "no:cacheprovider", "-p", "no:xdist"])
    assert code == 0 and collector.counts()["passed"] == 1
