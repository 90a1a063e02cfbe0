"""A full disk under the study database, the variant cache, the report and the exported repository, on a
small real filesystem (tmpfs) the tests mount: every output is written beside its final name and moved into
place, so a previous one stays whole; the error names the path and the space; finished trials are kept."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import optuna
import pytest

from optimizer.cli import main
from studies import FAST_CLI

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)"
)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 8 MiB at tmp_path/disk, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    """Fill ``disk`` to the last byte with a filler file (unbuffered: nothing is left to flush)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (65536, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def test_an_export_and_a_report_on_a_full_disk_leave_the_previous_ones_whole(mixed_study, small_disk, capsys):
    storage = ["--study-name", "mixed", "--storage", mixed_study.url]
    export = ["export", *storage, "--out", str(small_disk / "repo")]
    report = ["report", *storage, "--out", str(small_disk / "report")]
    assert main(export) == 0 and main(report) == 0
    capsys.readouterr()
    before = {name: _digests(small_disk / name) for name in ("repo", "report")}
    _fill(small_disk)
    assert main(export) == 5
    line = _one_line(capsys)
    assert f"no space left on the device of '{small_disk / 'repo' / 'mlp'}': it needs about" in line
    assert "MiB free" in line and "nothing half-written was left in place" in line
    assert main(report) == 5
    assert f"no space left on the device of '{small_disk / 'report'}'" in _one_line(capsys)
    # The previous export and report, byte for byte; no staging copy left beside them.
    assert {name: _digests(small_disk / name) for name in ("repo", "report")} == before
    assert not [p for p in (small_disk / "repo").iterdir() if p.name.startswith(".")]
    assert not [p for p in (small_disk / "report").iterdir() if p.name.startswith(".")]


@pytest.mark.server
def test_a_study_database_on_a_full_disk_keeps_its_finished_trials_and_resumes(models, small_disk, capsys):
    db = small_disk / "s.db"
    args = ["study", "--model", str(models["mlp"]), "--study-name", "s", "--storage", f"sqlite:///{db}"]
    assert main([*args, "--budget", "2", *FAST_CLI]) == 0
    capsys.readouterr()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    finished = {t.number: t.state for t in study.trials if t.state.is_finished()}
    _fill(small_disk)
    assert main([*args, "--budget", "4", *FAST_CLI]) == 5
    line = _one_line(capsys)
    assert f"no space left on the device of '{db}'" in line and "finished trials are kept" in line
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert {t.number: t.state for t in study.trials if t.number in finished} == finished
    (small_disk / "filler").unlink()  # space again: the same command resumes to its budget
    assert main([*args, "--budget", "4", *FAST_CLI]) == 0
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 4


def test_a_full_variant_cache_is_said_and_never_recorded_as_a_refused_precision(
    models, small_disk, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("OPTIMIZE_CACHE_DIR", str(small_disk / "cache"))
    _fill(small_disk)
    storage = f"sqlite:///{tmp_path / 'v.db'}"
    args = [
        "study",
        "--model",
        str(models["mlp"]),
        "--study-name",
        "v",
        "--storage",
        storage,
        "--budget",
        "2",
    ]
    assert main([*args, *FAST_CLI]) == 5
    line = _one_line(capsys)
    assert f"no space left on the device of '{small_disk / 'cache'}" in line
    study = optuna.load_study(study_name="v", storage=storage)
    assert "variants" not in study.user_attrs  # a resume with space builds and checks int8 as usual
