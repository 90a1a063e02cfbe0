"""``optimize dashboard``: optuna-dashboard on loopback, answering HTTP, stopped by Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from procs import listening_addresses
from web import free_port, get_when_up

from optimizer.cli import main
from optimizer.report.dashboard import dashboard_url

STARTUP_S = 60


@pytest.fixture(scope="module")
def storage_url(tmp_path_factory) -> str:
    """A small study database, written the way ``optimize study`` writes one (direction, user attributes)."""
    path = tmp_path_factory.mktemp("dashboard") / "dash.db"
    url = f"sqlite:///{path}"
    study = optuna.create_study(storage=url, study_name="dash", direction="maximize")
    study.set_user_attr("latency_budget_ms", 50.0)
    for throughput in (100.0, 180.0):
        trial = study.ask()
        trial.suggest_int("instance_count", 1, 4)
        trial.set_user_attr("throughput", throughput)
        study.tell(trial, throughput)
    return url


def _start(storage_url: str, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "optimizer",
        "dashboard",
        "--storage",
        storage_url,
        "--study-name",
        "dash",
        "--port",
        str(port),
    ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _first_line(process: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    if not ready:
        process.kill()
        pytest.fail(f"no URL printed within {timeout_s} s: {process.communicate()}")
    return process.stdout.readline()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_dashboard_serves_the_study_on_loopback_and_stops_on_a_signal(storage_url, stop_signal):
    port = free_port()
    process = _start(storage_url, port)
    try:
        line = _first_line(process, STARTUP_S)
        assert f"http://127.0.0.1:{port}/dashboard/studies/" in line, line
        url = line.split()[1]
        status, _ = get_when_up(url, STARTUP_S)
        assert status == 200
        status, body = get_when_up(f"http://127.0.0.1:{port}/api/studies", 10)
        assert status == 200 and "dash" in [
            study["study_name"] for study in json.loads(body)["study_summaries"]
        ]
        assert listening_addresses(port) == {"127.0.0.1"}
        process.send_signal(stop_signal)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "dashboard stopped" in out
    assert (
        not Path(f"/proc/{process.pid}").exists()
        or "Z" in Path(f"/proc/{process.pid}/stat").read_text().split()[2]
    )
    assert listening_addresses(port) == set()


def test_dashboard_refuses_a_busy_port_a_missing_study_and_no_storage_with_one_line(
    storage_url, tmp_path, capsys
):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            (
                ["dashboard", "--storage", storage_url, "--port", str(port)],
                2,
                f"cannot listen on 127.0.0.1:{port}",
            ),
            (
                ["dashboard", "--storage", storage_url, "--study-name", "other"],
                6,
                "no study named 'other'",
            ),
            (["dashboard", "--study-name", "absent"], 6, "no study 'absent'"),
            (["dashboard"], 2, "give --study-name NAME"),
        ]
        for args, code, fragment in cases:
            assert main(args) == code
            lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], lines


def test_dashboard_url_points_at_the_study_and_brackets_ipv6():
    assert dashboard_url("127.0.0.1", 8080) == "http://127.0.0.1:8080/dashboard/"
    assert dashboard_url("::1", 9000, 3) == "http://[::1]:9000/dashboard/studies/3"
    assert os.path.basename(dashboard_url("127.0.0.1", 1, 7)) == "7"
