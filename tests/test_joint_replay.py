"""Replaying joint studies: a recording of several models measured together on the real server, and
studies run from it without one (issue #19: replay works for multi-model studies as for single ones).

``bench/data/joint`` was recorded by bench/record_joint_surface.py on the real embedded Triton; one test
records a small surface itself, through the same script, and replays it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from web import free_port, get_when_up

from optimizer.cli import main
from optimizer.config.space import load_space
from optimizer.errors import ConfigRejected, UsageError
from optimizer.measurement.joint_replay import JointReplayTarget, is_joint_recording, load_joint_surface
from optimizer.paths import studies_dir
from optimizer.study.records import joint_budgets
from optimizer.study.targets import make_target

ROOT = Path(__file__).resolve().parent.parent
JOINT = ROOT / "bench" / "data" / "joint"

# Two configs per model (one or two instances, no batching): four joint configs, recorded in seconds.
SMALL_SPACE = """\
name: joint-test
device: cpu
execution_providers: [cpu]
precisions: [fp32]
max_batch_size: {choices: [1]}
preferred_batch_sizes: [[]]
max_queue_delay_us: {choices: [0]}
instance_count: {choices: [1, 2]}
oversubscribe: false
graph_levels: [default]
"""


def _cli(tmp_path: Path, *args: str, name: str = "r") -> int:
    return main(
        ["study", "--target", f"replay:{JOINT}", "--study-name", name, "--storage", _url(tmp_path), *args]
    )


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'replay.db'}"


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def small_recording(tmp_path_factory) -> Path:
    """Four joint configs of the encoder and the CNN recorded on a real embedded Triton by the bench script."""
    root = tmp_path_factory.mktemp("joint-recording")
    (root / "space.yaml").write_text(SMALL_SPACE)
    command = [
        sys.executable,
        str(ROOT / "bench" / "record_joint_surface.py"),
        "--repeats=1",
        "--levels=1,2",
        "--window-s=0.3",
        "--warmup-s=0.1",
        "--latency-budget-ms=encoder=500,cnn=500",
        f"--space={root / 'space.yaml'}",
        f"--out={root / 'recording'}",
        f"--work={root / 'work'}",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "recording"


def test_a_recording_of_the_real_server_holds_every_joint_config_and_replays_as_a_study(
    small_recording: Path, tmp_path: Path, capsys
) -> None:
    surface = load_joint_surface(small_recording)
    assert is_joint_recording(small_recording)
    assert len(surface.configs) == 4  # 2 x 2 joint configs, each measured once
    for config in surface.configs.values():
        assert len(config.sweeps) == 1 and not config.failures
        clients, figures = config.sweeps[0][0]
        assert clients == 2 and set(figures) == {"encoder", "cnn"}  # both models measured at each level
        assert all(f.throughput > 0 and f.p99_ms > 0 for f in figures.values())
    assert surface.meta["server_version"] and surface.meta["hardware"]["cores"] >= 1

    url = f"sqlite:///{tmp_path / 'small.db'}"
    code = main(["study", "--target", f"replay:{small_recording}", "--study-name", "s", "--storage", url])
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="s", storage=url)
    measured = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert measured
    for trial in measured:  # every level the study saw is one the real server measured
        config = next(c for c in surface.configs.values() if c.candidates == trial.user_attrs["candidates"])
        recorded = dict(config.sweeps[0])
        for level in trial.user_attrs["levels"]:
            for model, figures in level["models"].items():
                assert figures["throughput"] == recorded[level["clients"]][model].throughput
    assert study.user_attrs["server_version"].startswith("replay of ")


def test_the_committed_recording_measured_each_joint_config_of_its_space_at_least_twice() -> None:
    surface = load_joint_surface(JOINT)
    per_model = 4  # max batch 1 or 8, one or two instances (bench/data/joint-grid.yaml)
    assert len(surface.configs) == per_model ** len(surface.model_names)
    assert all(len(c.sweeps) + len(c.failures) >= 2 for c in surface.configs.values())
    assert load_space(surface.space_path).name == "joint-grid"
    assert surface.meta["repeats"] >= 2 and set(surface.latency_budgets_ms) == {"encoder", "cnn"}


def test_a_replayed_study_resumes_to_a_larger_budget_keeping_every_trial(tmp_path: Path, capsys) -> None:
    assert _cli(tmp_path, "--budget", "5", "--seed", "1") == 0, capsys.readouterr().err
    url = _url(tmp_path)
    first = {t.number: t.value for t in optuna.load_study(study_name="r", storage=url).trials}
    assert _cli(tmp_path, "--budget", "9", "--seed", "1") == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="r", storage=url)
    assert len(study.trials) >= 9
    assert {t.number: t.value for t in study.trials if t.number in first} == first
    assert joint_budgets(study.user_attrs) == load_joint_surface(JOINT).latency_budgets_ms
    assert study.trials[0].user_attrs["baseline"] is True
    best = studies_dir() / "r" / "best"  # one repository with both models, as a server study's
    assert {path.parent.name for path in best.glob("*/config.pbtxt")} == {"encoder", "cnn"}


def test_a_replay_takes_other_budgets_and_works_feasibility_out_again(tmp_path: Path, capsys) -> None:
    recorded = load_joint_surface(JOINT).latency_budgets_ms
    tight = recorded["encoder"] / 4
    code = _cli(tmp_path, "--budget", "6", "--seed", "1", "--latency-budget-ms", f"encoder={tight:g}")
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="r", storage=_url(tmp_path))
    assert joint_budgets(study.user_attrs) == {"encoder": tight, "cnn": recorded["cnn"]}
    levels = [level for trial in study.trials for level in trial.user_attrs.get("levels", [])]
    for level in levels:
        over = level["models"]["encoder"]["p99_ms"] > tight
        assert ("encoder" in level["over_budget"]) == over
    # Levels the recording kept within its own budget that break the tighter one: worked out again.
    assert any(level["models"]["encoder"]["p99_ms"] > tight for level in levels)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--traffic", "encoder=3,cnn=1"], "was measured in the traffic mix encoder=1, cnn=1"),
        (["--model", "examples/encoder.onnx"], "replays the models it recorded (encoder, cnn): drop --model"),
        (["--shape", "encoder.input_ids:64"], "drop --shape"),
        (["--concurrency", "1,2"], "--concurrency is an option of one model's study"),
    ],
)
def test_a_replay_asked_for_what_its_recording_lacks_is_one_line(
    args: list[str], fragment: str, tmp_path: Path, capsys
) -> None:
    assert _cli(tmp_path, *args) == 2
    assert fragment in _one_line(capsys)
    assert not (tmp_path / "replay.db").exists()


def test_a_joint_config_outside_the_recording_is_one_line_and_keeps_the_study(tmp_path: Path, capsys) -> None:
    wider = tmp_path / "wider.yaml"  # the recorded space and a max batch size of 16, never recorded
    wider.write_text((JOINT / "space.yaml").read_text().replace("choices: [1, 8]", "choices: [1, 8, 16]"))
    code = _cli(tmp_path, "--budget", "12", "--space", str(wider), "--seed", "2")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "this joint config is not in the recording" in line and "--space" in line, line
    study = optuna.load_study(study_name="r", storage=_url(tmp_path))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert finished and all("mbs=16" not in str(t.user_attrs["candidates"]) for t in finished)


def test_resuming_a_joint_study_in_another_space_is_one_line(tmp_path: Path, capsys) -> None:
    assert _cli(tmp_path, "--budget", "3", "--seed", "2") == 0
    capsys.readouterr()
    before = [
        (t.number, t.state, t.value) for t in optuna.load_study(study_name="r", storage=_url(tmp_path)).trials
    ]
    assert _cli(tmp_path, "--budget", "12", "--space", "cpu") == 6
    line = _one_line(capsys)
    assert "study 'r' searched another space (encoder." in line, line
    assert "resume it with the same --space" in line
    after = optuna.load_study(study_name="r", storage=_url(tmp_path)).trials
    assert [(t.number, t.state, t.value) for t in after] == before


def test_the_replay_target_draws_a_recorded_repeat_per_trial_and_ends_where_the_sweeps_did() -> None:
    target = make_target(f"replay:{JOINT}", seed=0)
    assert isinstance(target, JointReplayTarget)
    surface = target.surface
    config = next(c for c in surface.configs.values() if c.sweeps)
    shares = {"encoder": 0.5, "cnn": 0.5}
    budgets = surface.latency_budgets_ms
    seen = set()
    for _ in range(20):
        _load(target, config.key)
        clients, figures = config.sweeps[0][0]
        try:
            level = target.measure_mix(clients, shares, budgets)
        except ConfigRejected:
            continue
        assert level is not None
        seen.add(level.results["encoder"].throughput)
        assert level.mix_throughput == min(r.throughput / 0.5 for r in level.results.values())
    recorded = {dict(sweep)[config.sweeps[0][0][0]]["encoder"].throughput for sweep in config.sweeps}
    assert seen <= recorded and len(seen) >= min(2, len(recorded))
    assert target.measure_mix(1000, shares, budgets) is None  # no repeat reached 1000 clients


def test_a_joint_recording_refuses_models_and_configs_it_does_not_hold() -> None:
    target = make_target(f"replay:{JOINT}")
    with pytest.raises(UsageError, match="holds other models"):
        target.check_model("0" * 64)
    target.load_model("encoder", json.dumps({"name": "encoder", "max_batch_size": 3}), {})
    with pytest.raises(UsageError, match="not in the recording"):
        target.measure_mix(2, {"encoder": 0.5, "cnn": 0.5}, {"encoder": 1.0, "cnn": 1.0})


def _load(target: JointReplayTarget, key: str) -> None:
    """Load the recorded joint config ``key`` into the replay target, as a trial loads each model."""
    for name, config in target.surface.configs[key].configs.items():
        target.load_model(name, json.dumps(config), {})


def test_the_dashboard_shows_a_joint_study_with_each_models_parameters(tmp_path: Path, capsys) -> None:
    assert _cli(tmp_path, "--budget", "4", "--seed", "3") == 0, capsys.readouterr().err
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "optimizer",
        "dashboard",
        "--storage",
        _url(tmp_path),
        "--port",
        str(port),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "optuna-dashboard: http://127.0.0.1" in process.stdout.readline()
        study_id = optuna.load_study(study_name="r", storage=_url(tmp_path))._study_id
        _, answer = get_when_up(f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0", 30)
        body = json.loads(answer)
        params = {param["name"] for trial in body["trials"] for param in trial["params"]}
        assert {"encoder.instance_count", "cnn.instance_count", "encoder.max_batch_size"} <= params
        assert len(body["trials"]) == 4 and body["best_trials"]
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=20)
