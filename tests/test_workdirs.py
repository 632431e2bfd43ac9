"""Private directories (qtest_virtio/workdirs.py): the sweep of dead owners' directories runs on a
process's first machine start and then once per SWEEP_INTERVAL, not on every start."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from qtest_virtio import workdirs


def _dead_owners_dir(parent: Path) -> Path:
    child = subprocess.Popen(["true"])
    child.wait()
    path = parent / f"qtest-virtio-{child.pid}-1-abc"
    path.mkdir()
    return path


def test_make_workdir_sweeps_once_per_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(workdirs, "_last_sweep", {})
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    first = _dead_owners_dir(tmp_path)
    made = [workdirs.make_workdir()]
    assert not first.exists()  # the first start sweeps
    second = _dead_owners_dir(tmp_path)
    clock[0] += workdirs.SWEEP_INTERVAL - 1
    made.append(workdirs.make_workdir())
    assert second.exists()  # within the interval: no scan
    clock[0] += 1
    made.append(workdirs.make_workdir())
    assert not second.exists()  # the interval passed: swept again
    for path in made:  # ours are never swept, and each is private
        assert os.path.isdir(path) and os.stat(path).st_mode & 0o777 == 0o700
        assert os.path.basename(path).startswith(f"qtest-virtio-{os.getpid()}-")
        shutil.rmtree(path)
