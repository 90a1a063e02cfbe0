"""Replay target, canonicalisation and warm start, on the real recordings under bench/data/.

The recordings were measured on a real embedded Triton by bench/record_surface.py; these tests run
real studies (real SQLite, the real study loop, sampler and pruner) against them, without a server.
"""

from __future__ import annotations

import random
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from optimizer.cli import main
from optimizer.errors import UsageError
from optimizer.measurement.joint_replay import is_joint_recording
from optimizer.measurement.replay import ReplayTarget, draw_repeat, load_surface, replay_sweep
from optimizer.study.run import run_study
from optimizer.study.settings import SearchSettings, StudySettings
from studies import replay_settings

DATA = Path(__file__).resolve().parent.parent / "bench" / "data"
ENCODER = DATA / "encoder"
# One model's recordings (a joint recording has tests of its own: test_joint_replay.py).
SURFACES = sorted(
    path for path in DATA.iterdir() if (path / "meta.json").is_file() and not is_joint_recording(path)
)


def _replay_settings(surface, tmp_path: Path, **overrides) -> StudySettings:
    return replay_settings(surface.path, tmp_path, **overrides)


def _replay(surface_dir: Path, tmp_path: Path, seed: int = 0, **overrides):
    target = ReplayTarget(surface_dir, seed=seed)
    summary = run_study(_replay_settings(target.surface, tmp_path, seed=seed, **overrides), target=target)
    name = overrides.get("study_name", "replay")
    return summary, optuna.load_study(study_name=name, storage=summary.storage_url)


def _measured(study) -> list:
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state.is_finished() and "same_config_as" not in t.user_attrs and "config_digest" in t.user_attrs
    ]


@pytest.mark.parametrize("surface_dir", SURFACES, ids=[p.name for p in SURFACES])
def test_every_recording_holds_each_config_of_its_space_at_least_twice(surface_dir: Path) -> None:
    surface = load_surface(surface_dir)
    assert len(surface.configs) == 72
    for config in surface.configs.values():
        assert len(config.sweeps) + len(config.failures) >= 2, config.candidate
        for sweep in config.sweeps:
            assert [level.concurrency for level in sweep] == sorted(level.concurrency for level in sweep)
    assert surface.meta["model"]["sha256"] and surface.latency_budget_ms > 0
    assert surface.meta["hardware"]["cores"] >= 1


def test_a_replayed_sweep_is_a_recorded_one_drawn_at_random() -> None:
    surface = load_surface(ENCODER)
    config = next(c for c in surface.configs.values() if len(c.sweeps) >= 2 and c.sweeps[0] != c.sweeps[1])
    rng = random.Random(0)
    drawn = {draw_repeat(config, rng) for _ in range(40)}
    assert drawn == set(config.sweeps)  # every repeat comes up, nothing else does
    levels = [level.concurrency for level in config.sweeps[0]]
    replayed = replay_sweep(config, config.sweeps[0], levels, lambda index, level: True, rng)
    assert tuple(replayed) == config.sweeps[0]


def test_a_study_against_the_replay_target_gets_recorded_measurements(tmp_path: Path) -> None:
    summary, study = _replay(ENCODER, tmp_path, budget=8)
    surface = load_surface(ENCODER)

    assert summary.finished == 8
    assert study.user_attrs["target"] == "replay"
    for trial in _measured(study):
        recorded = surface.configs[trial.user_attrs["config_digest"]]
        for level in trial.user_attrs.get("sweep", []):
            level = {
                key: value for key, value in level.items() if key != "phase"
            }  # the trial's, not recorded
            candidates = [
                r.to_dict()
                for sweep in recorded.sweeps
                for r in sweep
                if r.concurrency == level["concurrency"]
            ]
            assert level in candidates
    assert summary.best is not None and summary.best_repository is not None


def test_the_replay_target_refuses_a_config_outside_its_recording(tmp_path: Path) -> None:
    target = ReplayTarget(ENCODER, seed=0)
    with pytest.raises(UsageError, match="not in the recording .* search the space it recorded"):
        run_study(_replay_settings(target.surface, tmp_path, space="cpu", budget=10), target=target)


def test_the_replay_target_refuses_another_model(models, tmp_path: Path) -> None:
    target = ReplayTarget(ENCODER, seed=0)
    settings = _replay_settings(target.surface, tmp_path, model_path=models["mlp"], shapes={})
    with pytest.raises(UsageError, match="is of another model"):
        run_study(settings, target=target)


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_canonicalisation_never_measures_one_rendered_config_twice(sampler: str, tmp_path: Path) -> None:
    # 40 measured trials in a 72-config space whose 96 parameter points render alike in places.
    summary, study = _replay(ENCODER, tmp_path, seed=3, budget=40, sampler=sampler)
    keys = [t.user_attrs["config_digest"] for t in _measured(study)]
    assert len(keys) == summary.finished == 40
    assert len(set(keys)) == len(keys)
    reused = [t for t in study.get_trials(deepcopy=False) if "same_config_as" in t.user_attrs]
    for trial in reused:  # a repeat copies the measurement of the trial it names
        earlier = study.trials[trial.user_attrs["same_config_as"]]
        assert trial.user_attrs["config_digest"] == earlier.user_attrs["config_digest"]
        assert trial.user_attrs.get("throughput") == earlier.user_attrs.get("throughput")


def test_the_grid_sampler_measures_every_config_of_a_listed_space_once(tmp_path: Path) -> None:
    summary, study = _replay(ENCODER, tmp_path, budget=72, sampler="grid", pruning=False)
    keys = {t.user_attrs["config_digest"] for t in _measured(study)}
    assert summary.finished == 72
    assert keys == set(load_surface(ENCODER).configs)


def test_warm_start_measures_the_prior_studys_best_configs_first(tmp_path: Path) -> None:
    _, prior = _replay(ENCODER, tmp_path, budget=12, study_name="prior")
    best_first = sorted(
        (t for t in prior.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE),
        key=lambda t: t.value,
        reverse=True,
    )
    expected = []
    for trial in best_first:
        if trial.params not in expected:
            expected.append(trial.params)

    _, study = _replay(ENCODER, tmp_path, seed=5, budget=5, study_name="next", warm_start="prior")

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert trials[0].user_attrs["baseline"] is True
    assert [t.params for t in trials[1:4]] == expected[:3]
    assert all(t.user_attrs["warm_start"] is True for t in trials[1:4])


def test_warm_start_from_a_missing_study_is_one_clear_error(tmp_path: Path) -> None:
    from optimizer.errors import StudyError

    with pytest.raises(StudyError, match="no study 'nowhere' to warm-start from"):
        _replay(ENCODER, tmp_path, warm_start="nowhere")
    assert not (tmp_path / "replay.db").exists()


def test_optimize_study_replays_a_recording_with_its_own_model_and_space(tmp_path: Path, capsys) -> None:
    args = ["study", "--target", f"replay:{ENCODER}", "--budget", "6", "--seed", "1"]
    code = main(args + ["--study-name", "cli-replay", "--storage", f"sqlite:///{tmp_path / 'r.db'}"])
    assert code == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="cli-replay", storage=f"sqlite:///{tmp_path / 'r.db'}")
    assert study.user_attrs["target"] == "replay"
    assert study.user_attrs["space"]["name"] == "grid-small"


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("replay:", "--target replay takes the recording's directory"),
        ("replay:/nonexistent/recording", "is not a recorded surface (missing meta.json"),
        ("embedded:x", "--target embedded takes no ':' argument"),
    ],
)
def test_a_bad_replay_target_is_one_line(target: str, fragment: str, tmp_path: Path, capsys) -> None:
    code = main(["study", "--target", target, "--storage", f"sqlite:///{tmp_path / 'r.db'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "r.db").exists()


def test_starting_points_are_measured_right_after_the_baseline(tmp_path: Path) -> None:
    search = SearchSettings(starting_points=("batching", "batching-lowp"))
    _, study = _replay(ENCODER, tmp_path, budget=4, search=search)
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert trials[0].user_attrs["baseline"] is True
    assert [t.user_attrs.get("starting_point") for t in trials[1:3]] == [True, True]
    assert [t.params["precision"] for t in trials[1:3]] == ["fp32", "int8"]
    assert all(t.params["max_batch_size"] == 32 for t in trials[1:3])
    # A recording is another machine's server: this machine's in-process figures would not compare.
    assert "recording" in study.user_attrs["inprocess_profile"]["skipped"]


def test_resuming_a_study_in_another_space_is_one_line_and_keeps_its_trials(tmp_path: Path, capsys) -> None:
    args = ["study", "--target", f"replay:{ENCODER}", "--study-name", "sp", "--storage", _url(tmp_path)]
    assert main([*args, "--budget", "3"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    before = [
        (t.number, t.state, t.value)
        for t in optuna.load_study(study_name="sp", storage=_url(tmp_path)).trials
    ]
    assert main([*args, "--budget", "8", "--space", "cpu"]) == 6
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "study 'sp' searched another space (" in err[0], err
    after = optuna.load_study(study_name="sp", storage=_url(tmp_path)).trials
    assert [(t.number, t.state, t.value) for t in after] == before


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'r.db'}"
