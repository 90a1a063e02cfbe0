"""``optimize doctor``: every check reported with its fix, the real ones run for real, exit 0."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from optimizer import doctor
from optimizer.cli import main


def _executable(path: Path, script: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.server
def test_doctor_reports_what_this_machine_can_do_and_exits_zero(capsys, monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    code = main(["doctor"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    by_name = {line[9:29].strip(): line for line in lines if not line.startswith(" ")}
    assert by_name.keys() >= {
        "target embedded",
        "target local",
        "target docker",
        "target remote",
        "execution providers",
        "GPUs",
        "perf_analyzer",
    }
    assert (
        by_name["target embedded"].startswith("ok")
        and "2.51.0 started and stopped" in by_name["target embedded"]
    )
    assert by_name["target docker"].startswith("missing") and "cannot reach a Docker daemon" in out
    assert "run here: cpu" in by_name["execution providers"]
    # Each missing piece is followed by its fix.
    for index, line in enumerate(lines):
        if line.startswith("missing"):
            assert lines[index + 1].strip().startswith("fix: "), line


def test_local_tritonserver_on_path_is_found_with_its_backends(tmp_path, monkeypatch):
    _executable(tmp_path / "triton" / "bin" / "tritonserver", "#!/bin/sh\n")
    (tmp_path / "triton" / "backends").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "triton" / "bin"))
    check = doctor.check_local()
    assert check.ok and str(tmp_path / "triton" / "backends") in check.detail
    monkeypatch.setenv("PATH", str(tmp_path))
    missing = doctor.check_local()
    assert not missing.ok and "--triton-binary" in missing.fix


def test_a_check_that_breaks_is_reported_not_raised():
    def check_broken():
        raise RuntimeError("boom")

    results = doctor.run_checks((doctor.check_remote, check_broken))
    assert [r.ok for r in results] == [True, False]
    assert results[1].name == "broken" and "RuntimeError: boom" in results[1].detail


def test_format_puts_the_fix_under_its_check():
    lines = doctor.format_check(doctor.Check("GPUs", False, "none seen", "install a driver"))
    assert lines[0].split() == ["missing", "GPUs", "none", "seen"]
    assert lines[1].strip() == "fix: install a driver"
