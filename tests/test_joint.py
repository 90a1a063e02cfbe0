"""Several models tuned together: the models file, the mixed load, a joint study on the real server."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import pandas as pd
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from optimizer.cli import main
from optimizer.config.render import config_from_json, config_from_pbtxt, render_ensemble, to_pbtxt
from optimizer.errors import UsageError
from optimizer.measurement.levels import LevelResult, MeasureSettings
from optimizer.measurement.mixed import mix_schedule, mix_throughput, shares_of
from optimizer.model import examples
from optimizer.model.ensemble import load_ensemble, run_ensemble
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.model.variants import config_files
from optimizer.output.plan import make_plan
from optimizer.output.serve import serving
from optimizer.paths import cache_dir
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.study.models_file import load_models_file, models_from_flags
from optimizer.study.records import joint_budgets
from optimizer.study.run import run_study
from optimizer.study.settings import StudySettings

FAST = MeasureSettings(warmup_s=0.1, window_s=0.4, max_window_s=0.4, min_requests=5, rule="fixed")
CNN_SHAPES = "{image: [3, 32, 32]}"


def _models_file(tmp_path: Path, models, body: str | None = None) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        body
        or f"""models:
  - name: mlp
    path: {models["mlp"]}
    traffic: 3
    latency_budget_ms: 200
  - name: cnn
    path: {models["cnn"]}
    shapes: {CNN_SHAPES}
    traffic: 1
    latency_budget_ms: 300
"""
    )
    return path


def _level(throughput: float) -> LevelResult:
    return LevelResult(
        concurrency=1, throughput=throughput, p50_ms=1, p95_ms=1, p99_ms=1, requests=10, duration_s=1
    )


# --- the mix (pure) ------------------------------------------------------------------------------------


def test_the_schedule_keeps_every_stretch_in_the_traffic_mix():
    shares = shares_of({"a": 3, "b": 1})
    assert shares == {"a": 0.75, "b": 0.25}
    schedule = mix_schedule(shares)
    assert "".join(schedule[:12]) == "aabaaabaaaba"
    assert schedule.count("a") == 3 * schedule.count("b")
    for start in range(0, len(schedule) - 8):  # no burst: any 8 requests hold 2 of b, give or take one
        assert 1 <= schedule[start : start + 8].count("b") <= 3
    thirds = mix_schedule(shares_of({"x": 1, "y": 1, "z": 1}), length=9)
    assert sorted(thirds[:3]) == ["x", "y", "z"]


def test_the_schedule_sends_the_smallest_share_too():
    schedule = mix_schedule(shares_of({"a": 300, "b": 1}))
    assert schedule.count("b") == 1 and schedule.count("a") == 300


def test_the_mix_throughput_is_set_by_the_model_furthest_behind_its_share():
    shares = shares_of({"a": 3, "b": 1})
    # a served 300/s (its share of 400/s), b 150/s (its share of 600/s): the mix sustains 400/s.
    assert mix_throughput({"a": _level(300.0), "b": _level(150.0)}, shares) == pytest.approx(400.0)


def test_a_models_file_takes_file_level_traffic_and_budgets(tmp_path, models):
    path = _models_file(
        tmp_path,
        models,
        f"""models:
  - {{name: mlp, path: {models["mlp"]}}}
  - {{name: cnn, path: {models["cnn"]}, shapes: {CNN_SHAPES}, latency_budget_ms: 40}}
traffic: {{mlp: 2, cnn: 1}}
latency_budget_ms: {{mlp: 25}}
""",
    )
    mlp, cnn = load_models_file(path)
    assert (mlp.name, mlp.traffic, mlp.latency_budget_ms) == ("mlp", 2.0, 25.0)
    assert (cnn.traffic, cnn.latency_budget_ms, cnn.shapes) == (1.0, 40.0, {"image": (3, 32, 32)})


# --- bad input: one line, nothing touched ----------------------------------------------------------------


BAD_FILES = [
    (
        "unknown-in-traffic",
        "traffic: {mlp: 1, bert: 2}",
        "traffic names 'bert', which is not one of the models",
    ),
    ("budget-for-unknown", "latency_budget_ms: {gpt: 5}", "latency_budget_ms names 'gpt'"),
    ("bad-traffic", "traffic: {mlp: -1}", "must be a positive number"),
    ("unknown-field", "concurrency: 4", "unknown field 'concurrency'"),
]


@pytest.mark.parametrize(("case", "extra", "fragment"), BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_a_bad_models_file_is_one_line_and_leaves_an_existing_study_intact(
    tmp_path, models, capsys, case, extra, fragment
):
    db = tmp_path / "j.db"
    optuna.create_study(study_name="j", storage=f"sqlite:///{db}").enqueue_trial({"x": 1})
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    body = f"models:\n  - {{name: mlp, path: {models['mlp']}}}\n  - {{name: cnn, path: {models['cnn']}}}\n{extra}\n"
    path = _models_file(tmp_path, models, body)
    code = main(["study", "--models", str(path), "--study-name", "j", "--storage", f"sqlite:///{db}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("models:\n  - {name: a, path: m.onnx}\n  - {name: a, path: n.onnx}\n", "names two models 'a'"),
        ("models:\n  - {name: a, path: m.onnx}\n", "names one model"),
        ("models: [1, 2]\n", "model 1 must be a mapping"),
        ("models:\n  - {path: m.onnx}\n  - {name: b, path: n.onnx}\n", "model 1 has no name"),
        ("[not, a, mapping]\n", "must hold 'models:'"),
    ],
)
def test_models_file_rules_each_name_what_to_fix(tmp_path, body, fragment):
    path = tmp_path / "models.yaml"
    path.write_text(body)
    with pytest.raises(UsageError, match=fragment):
        load_models_file(path)


def test_models_with_a_single_model_flag_is_refused(tmp_path, models, capsys):
    path = _models_file(tmp_path, models)
    code = main(["study", "--models", str(path), "--model", str(models["mlp"])])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "drop --model" in err[0]
    missing = main(["study", "--models", str(tmp_path / "nope.yaml")])
    assert missing == 2 and "does not exist" in capsys.readouterr().err


# --- a joint study on the real server ------------------------------------------------------------------------


@pytest.mark.server
def test_a_joint_study_loads_measures_and_exports_both_models_within_their_budgets(tmp_path, models, triton):
    entries = load_models_file(_models_file(tmp_path, models))
    settings = StudySettings(
        models=entries,
        budget=3,
        study_name="joint",
        output_dir=tmp_path,
        seed=0,
        measure=FAST,
        concurrency=(1, 2),
    )
    summary = run_study(settings, target=triton)
    study = optuna.load_study(study_name="joint", storage=f"sqlite:///{tmp_path}/joint.db")
    assert joint_budgets(study.user_attrs) == {"mlp": 200.0, "cnn": 300.0}
    assert study.user_attrs["traffic"] == {"mlp": 3.0, "cnn": 1.0}
    measured = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("surplus")]
    assert summary.finished == len(measured) == 3
    assert measured[0].user_attrs["baseline"] is True
    for trial in measured:
        assert set(trial.user_attrs["configs"]) == {"mlp", "cnn"}  # both loaded, every trial
        for level in trial.user_attrs.get("levels", []):
            assert set(level["models"]) == {"mlp", "cnn"}  # both measured, at once
            requests = {name: m["requests"] for name, m in level["models"].items()}
            assert 2.0 <= requests["mlp"] / requests["cnn"] <= 4.5, requests  # sent in the 3:1 mix
            assert all(m["throughput"] > 0 for m in level["models"].values())
    best = next(t for t in measured if t.number == summary.best_trial)
    for name, figures in best.user_attrs["best_level"]["models"].items():
        assert figures["p99_ms"] <= joint_budgets(study.user_attrs)[name]  # each budget respected
    assert summary.best_throughput == pytest.approx(best.value)
    assert summary.bound_by and set(summary.per_model) == {"mlp", "cnn"}
    # The plan of the mix: servers from the best trial's mix throughput, and whether both models fit together.
    plan = make_plan(study, 1000.0, server_memory_gb=1.0)
    sizing = plan.sizings[0]
    assert sizing.capacity.trial == best.number and sizing.capacity.throughput_per_server == best.value
    assert sizing.servers == math.ceil(1000.0 / (best.value * 0.7)) and plan.models == ("mlp", "cnn")
    assert plan.memory is not None and plan.memory.memory_mb == best.user_attrs["memory_mb"] > 0
    assert plan.memory.copies == int(1024 // best.user_attrs["memory_mb"])
    # Both models are on the server together, and the exported repository holds both.
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    assert client.is_model_ready("mlp") and client.is_model_ready("cnn")
    client.close()
    repository = summary.best_repository
    assert sorted(p.name for p in repository.iterdir() if not p.name.startswith(".")) == ["cnn", "mlp"]
    with serving(repository) as served:
        client = grpcclient.InferenceServerClient(served.server.grpc_url)
        for name, shapes in (("mlp", {}), ("cnn", {"image": (3, 32, 32)})):
            info = inspect_model(models[name])
            feeds = synthetic_inputs(info, resolve_shapes(info, shapes), 1, seed=1)
            tensors = []
            for input_name, array in feeds.items():
                tensor = grpcclient.InferInput(input_name, list(array.shape), np_to_triton_dtype(array.dtype))
                tensor.set_data_from_numpy(array)
                tensors.append(tensor)
            result = client.infer(name, tensors)
            assert np.isfinite(result.as_numpy(info.outputs[0].name)).all()
        client.close()
    # Rerun with a larger budget: it resumes, runs only what is missing.
    again = run_study(
        StudySettings(
            models=entries,
            budget=4,
            study_name="joint",
            output_dir=tmp_path,
            measure=FAST,
            concurrency=(1, 2),
        ),
        target=triton,
    )
    assert again.finished == 4


class _KilledOnLoad(EmbeddedTriton):
    """A real embedded Triton that is SIGKILLed a second after its ``kill_on``-th model load."""

    def __init__(self, kill_on: int) -> None:
        super().__init__()
        self.loads, self.kill_on, self.killed = 0, kill_on, False

    def load_model(self, name, config_json, files):
        seconds = super().load_model(name, config_json, files)
        self.loads += 1
        if self.loads == self.kill_on:
            self.killed = True
            threading.Timer(1.0, os.kill, (self.pid, signal.SIGKILL)).start()
        return seconds


@pytest.mark.server
def test_a_server_killed_under_the_mixed_load_fails_that_trial_and_a_restarted_server_runs_the_next(
    tmp_path, models
):
    # The one-model rule, now the joint study's too: the fault is the trial's, the server is restarted.
    entries = load_models_file(_models_file(tmp_path, models))
    measure = MeasureSettings(warmup_s=0.3, window_s=2.0, min_requests=10, max_window_s=3.0, rule="fixed")
    server = _KilledOnLoad(kill_on=4)  # trial 1's second model: killed a second into its mixed load
    with server:
        summary = run_study(
            StudySettings(
                models=entries, budget=3, study_name="j", output_dir=tmp_path, seed=0, measure=measure
            ),
            target=server,
        )
    assert server.killed
    study = optuna.load_study(study_name="j", storage=f"sqlite:///{tmp_path}/j.db")
    killed = study.trials[1]
    assert killed.state == optuna.trial.TrialState.FAIL
    assert killed.user_attrs["reason"].startswith(
        "the server crashed under the mixed load (killed by signal 9"
    )
    assert killed.user_attrs["transient_fault"] is True
    # The server's log tail kept with the trial (its last line in the reason), before the restart.
    log = killed.user_attrs["server_log"]
    assert log.strip() and len(log.splitlines()) <= 40
    assert f"its log ended: {log.strip().splitlines()[-1].strip()[:60]}" in killed.user_attrs["reason"]
    assert summary.finished == 3 and study.trials[2].state == optuna.trial.TrialState.COMPLETE


# --- an ensemble, tuned as its steps ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ensemble_repo(tmp_path_factory) -> Path:
    """A Triton repository holding an ensemble ``pipeline`` of two ONNX steps (``pre`` then ``head``)."""
    root = tmp_path_factory.mktemp("ensemble-repo")
    examples.build_ensemble(root)
    return root


def _ensemble_models_file(tmp_path: Path, repo: Path, models, extra: str = "") -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        f"""models:
  - {{name: pipeline, path: {repo / "pipeline"}, latency_budget_ms: 300}}
  - {{name: cnn, path: {models["cnn"]}, shapes: {CNN_SHAPES}, latency_budget_ms: 300}}
{extra}"""
    )
    return path


def test_an_ensemble_is_read_with_its_steps_in_running_order(ensemble_repo):
    ensemble = load_ensemble(ensemble_repo / "pipeline")
    assert [s.model_name for s in ensemble.steps] == ["pre", "head"]
    assert ensemble.steps[0].path == ensemble_repo / "pre" / "1" / "model.onnx"
    assert (ensemble.inputs, ensemble.outputs, ensemble.max_batch_size) == (("INPUT",), ("OUTPUT",), 8)
    # Listed out of order, the steps still run in the order their tensors allow.
    config = config_from_pbtxt(ensemble.config_text)
    steps = list(config.ensemble_scheduling.step)
    del config.ensemble_scheduling.step[:]
    config.ensemble_scheduling.step.extend(reversed(steps))
    swapped = ensemble_repo / "swapped" / "config.pbtxt"
    swapped.parent.mkdir()
    swapped.write_text(to_pbtxt(config))
    assert [s.model_name for s in load_ensemble(swapped).steps] == ["pre", "head"]


def test_render_ensemble_lowers_its_max_batch_to_what_every_step_accepts(ensemble_repo):
    ensemble = load_ensemble(ensemble_repo / "pipeline")
    config = render_ensemble("pipeline", ensemble.config_text, {"pre": 4, "head": 16})
    assert (config.name, config.platform, config.max_batch_size) == ("pipeline", "ensemble", 4)
    assert [s.model_version for s in config.ensemble_scheduling.step] == [-1, -1]
    assert render_ensemble("p", ensemble.config_text, {"pre": 32, "head": 16}).max_batch_size == 8


BAD_ENSEMBLES = [
    (
        "no-config",
        lambda repo: (repo / "pipeline" / "config.pbtxt").unlink(),
        3,
        "is a directory with no config.pbtxt",
    ),
    (
        "not-an-ensemble",
        lambda repo: (repo / "pipeline" / "config.pbtxt").write_text('name: "pipeline"\nbackend: "python"\n'),
        3,
        "is not an ensemble",
    ),
    (
        "python-step",
        lambda repo: (repo / "head" / "config.pbtxt").write_text('backend: "python"\n'),
        3,
        "optimize tunes ensembles whose steps are ONNX models",
    ),
    (
        "missing-step",
        lambda repo: __import__("shutil").rmtree(repo / "head"),
        3,
        "runs 'head', which is not in its repository",
    ),
    ("step-named-like-a-model", lambda repo: None, 2, "'pre' names two models on the server"),
    (
        "unknown-step-input",
        lambda repo: _edit(
            repo / "pipeline" / "config.pbtxt", 'key: "x" value: "INPUT"', 'key: "y" value: "INPUT"'
        ),
        3,
        "step 'pre' has no input 'y' (its inputs: x)",
    ),
    (
        "unread-input",
        lambda repo: _edit(
            repo / "pipeline" / "config.pbtxt",
            'input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 64 ] } ]',
            'input [ { name: "INPUT" data_type: TYPE_FP32 dims: [ 64 ] }, '
            '{ name: "EXTRA" data_type: TYPE_FP32 dims: [ 3 ] } ]',
        ),
        3,
        "no step reads its input 'EXTRA'",
    ),
    (
        "batching-over-a-fixed-batch-step",
        lambda repo: examples.build_fixed_batch_mlp(
            repo / "head" / "1" / "model.onnx", in_features=32, hidden=16, batch=2
        ),
        3,
        "ensemble 'pipeline' batches (max_batch_size 8) but step 'head' has no dynamic batch dimension",
    ),
    (
        "shared-step",
        lambda repo: examples.build_ensemble(repo, name="other"),
        2,
        "ensembles share the step 'pre'",
    ),
]


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    ("case", "spoil", "code", "fragment"), BAD_ENSEMBLES, ids=[c[0] for c in BAD_ENSEMBLES]
)
def test_a_bad_ensemble_is_one_line_and_leaves_an_existing_study_intact(
    tmp_path, models, capsys, case, spoil, code, fragment
):
    repo = tmp_path / "repo"
    examples.build_ensemble(repo)
    spoil(repo)
    db = tmp_path / "j.db"
    optuna.create_study(study_name="j", storage=f"sqlite:///{db}").enqueue_trial({"x": 1})
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    path = _ensemble_models_file(tmp_path, repo, models)
    if case == "step-named-like-a-model":
        path.write_text(path.read_text().replace("name: cnn", "name: pre"))
    if case == "shared-step":
        path.write_text(
            f"models:\n  - {{name: pipeline, path: {repo / 'pipeline'}}}\n  - {{name: o, path: {repo / 'other'}}}\n"
        )
    exit_code = main(["study", "--models", str(path), "--study-name", "j", "--storage", f"sqlite:///{db}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_code == code and len(err) == 1 and fragment in err[0], err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


@pytest.mark.server
def test_an_ensemble_is_tuned_as_its_steps_and_measured_through_it(tmp_path, models, ensemble_repo, triton):
    entries = load_models_file(_ensemble_models_file(tmp_path, ensemble_repo, models))
    settings = StudySettings(
        models=entries,
        budget=3,
        study_name="ens",
        output_dir=tmp_path,
        seed=1,
        measure=FAST,
        concurrency=(1, 2),
    )
    summary = run_study(settings, target=triton)
    study = optuna.load_study(study_name="ens", storage=f"sqlite:///{tmp_path}/ens.db")
    assert study.user_attrs["ensembles"] == {"pipeline": ["pre", "head"]}
    assert set(joint_budgets(study.user_attrs)) == {"pipeline", "cnn"}
    measured = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("surplus")]
    assert len(measured) == 3
    step_params = {name for t in measured for name in t.params if name.split(".")[0] in ("pre", "head")}
    assert {"pre.instance_count", "head.instance_count"} <= step_params  # each step has its own config
    for trial in measured:
        configs = trial.user_attrs["configs"]
        assert set(configs) == {"pre", "head", "pipeline", "cnn"}  # the steps, the ensemble and the model
        ensemble_batch = configs["pipeline"].get("max_batch_size", 0)
        assert 1 <= ensemble_batch <= min(configs[s]["max_batch_size"] for s in ("pre", "head"))
        for level in trial.user_attrs["levels"]:
            assert set(level["models"]) == {"pipeline", "cnn"}  # the traffic goes through the ensemble
            assert all(m["throughput"] > 0 for m in level["models"].values())
    assert "pre:" in summary.per_model["pipeline"]["candidate"]
    # What the tuned ensemble answers is what its steps' served files give, run one after the other:
    # on the study's server (the last trial's configs) and from the exported repository on a fresh one.
    ensemble = load_ensemble(ensemble_repo / "pipeline")
    request = {"INPUT": np.random.default_rng(5).random((1, 64), dtype=np.float32)}
    best = next(t for t in measured if t.number == summary.best_trial)
    for server, trial in ((triton, measured[-1]), (None, best)):
        expected, _ = run_ensemble(ensemble, _served_sessions(ensemble, trial.user_attrs["configs"]), request)
        with contextlib.ExitStack() as stack:
            if server is None:
                server = stack.enter_context(serving(summary.best_repository)).server
            client = grpcclient.InferenceServerClient(server.grpc_url)
            tensor = grpcclient.InferInput("INPUT", [1, 64], "FP32")
            tensor.set_data_from_numpy(request["INPUT"])
            served = client.infer("pipeline", [tensor]).as_numpy("OUTPUT")
            client.close()
        np.testing.assert_allclose(served, expected["OUTPUT"], rtol=1e-5, atol=1e-6)
    exported = summary.best_repository
    assert sorted(p.name for p in exported.iterdir() if not p.name.startswith(".")) == [
        "cnn",
        "head",
        "pipeline",
        "pre",
    ]
    assert (exported / "pipeline" / "1").is_dir()
    # The report shows each model's figures and what bound the best trial; the CSV has them per trial.
    storage = f"sqlite:///{tmp_path}/ens.db"
    assert main(["report", "--study-name", "ens", "--storage", storage, "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "report.html").read_text()
    assert "pipeline, cnn on one Triton Inference Server" in page and "pre → head" in page
    assert "Why the best trial&#x27;s sweep stopped" in page and f"#{summary.best_trial}" in page
    rows = pd.read_csv(tmp_path / "r" / "trials.csv")
    assert len(rows) == 3 and {"pipeline.p99_ms", "cnn.throughput", "pre.candidate", "bound_by"} <= set(rows)
    best_row = rows[rows.number == summary.best_trial].iloc[0]
    assert best_row["mix_throughput"] == pytest.approx(summary.best_throughput)
    assert best_row["pipeline.p99_ms"] <= best_row["pipeline.budget_ms"]
    # optimize export writes the same repository, with deployment manifests naming the study.
    out = tmp_path / "kserve"
    args = ["export", "--study-name", "ens", "--storage", storage, "--out", str(out), "--format", "kserve"]
    assert main(args) == 0
    assert sorted(p.name for p in (out / "models").iterdir()) == ["cnn", "head", "pipeline", "pre"]
    assert "name: ens" in (out / "inferenceservice.yaml").read_text()


def _served_sessions(ensemble, configs) -> dict:
    """ONNX Runtime sessions of the files each step's config serves (fp32 or a variant)."""
    sessions = {}
    for step in ensemble.steps:
        config = config_from_json(configs[step.model_name])
        files = config_files(inspect_model(step.path, cache=cache_dir()), config, cache_dir())
        sessions[step.model_name] = ort.InferenceSession(
            str(next(iter(files.values()))), providers=["CPUExecutionProvider"]
        )
    return sessions


# --- several --model flags instead of a models file -------------------------------------------------------------


def test_several_model_flags_name_each_model_after_its_file(models):
    mlp, cnn = models_from_flags(
        [models["mlp"], models["cnn"]], {"cnn.image": (3, 32, 32)}, "mlp=3,cnn=1", "mlp=20,cnn=50"
    )
    assert (mlp.name, mlp.traffic, mlp.latency_budget_ms, mlp.shapes) == ("mlp", 3.0, 20.0, {})
    assert (cnn.name, cnn.traffic, cnn.latency_budget_ms, cnn.shapes) == (
        "cnn",
        1.0,
        50.0,
        {"image": (3, 32, 32)},
    )
    same = models_from_flags([models["mlp"], models["cnn"]], {}, None, "40")
    assert [(e.traffic, e.latency_budget_ms) for e in same] == [(1.0, 40.0), (1.0, 40.0)]


BAD_FLAGS = [
    ("one-model-option", ["--concurrency", "1,2"], "--concurrency is an option of one model's study"),
    (
        "unknown-in-traffic",
        ["--traffic", "mlp=1,bert=2"],
        "traffic names 'bert', which is not one of the models",
    ),
    ("budget-for-unknown", ["--latency-budget-ms", "gpt=5"], "latency_budget_ms names 'gpt'"),
    ("malformed-traffic", ["--traffic", "mlp:3"], "--traffic 'mlp:3' is malformed"),
    ("shape-without-model", ["--shape", "image:3,32,32"], "name the model of each shape"),
    ("input-data", ["--input-data", "x.npz"], "in a models file"),
    (
        "a-recording",
        ["--target", f"replay:{Path(__file__).parents[1] / 'bench' / 'data' / 'cnn'}"],
        "this recording (--target replay:) is of one model",
    ),
]


@pytest.mark.parametrize(("case", "extra", "fragment"), BAD_FLAGS, ids=[c[0] for c in BAD_FLAGS])
def test_bad_several_model_flags_are_one_line_and_leave_an_existing_study_intact(
    tmp_path, models, capsys, case, extra, fragment
):
    db = tmp_path / "j.db"
    optuna.create_study(study_name="j", storage=f"sqlite:///{db}").enqueue_trial({"x": 1})
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    args = ["study", "--model", str(models["mlp"]), "--model", str(models["cnn"]), *extra]
    code = main([*args, "--study-name", "j", "--storage", f"sqlite:///{db}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_two_models_with_one_file_name_and_traffic_for_one_model_are_refused(tmp_path, models, capsys):
    twin = tmp_path / "other" / "mlp.onnx"
    twin.parent.mkdir()
    twin.write_bytes(models["mlp"].read_bytes())
    assert main(["study", "--model", str(models["mlp"]), "--model", str(twin)]) == 2
    assert "two --model files are named 'mlp'" in capsys.readouterr().err
    assert main(["study", "--model", str(models["mlp"]), "--traffic", "mlp=1"]) == 2
    assert "give --model twice or more" in capsys.readouterr().err


@pytest.mark.server
def test_two_model_flags_run_a_joint_study_with_its_report(tmp_path, models):
    storage = f"sqlite:///{tmp_path}/flags.db"
    args = ["study", "--model", str(models["mlp"]), "--model", str(models["cnn"])]
    args += [
        "--traffic",
        "mlp=3,cnn=1",
        "--latency-budget-ms",
        "mlp=200,cnn=300",
        "--shape",
        "cnn.image:3,32,32",
    ]
    args += ["--budget", "2", "--seed", "0", "--study-name", "flags", "--storage", storage]
    assert main([*args, "--window-s", "0.3", "--warmup-s", "0.1"]) == 0
    study = optuna.load_study(study_name="flags", storage=storage)
    assert study.user_attrs["traffic"] == {"mlp": 3.0, "cnn": 1.0}
    assert joint_budgets(study.user_attrs) == {"mlp": 200.0, "cnn": 300.0}
    assert sum(1 for t in study.trials if t.user_attrs.get("levels")) == 2
    report = Path(os.environ["OPTIMIZE_STUDIES_DIR"]) / "flags" / "report"
    assert (report / "report.html").is_file() and (report / "trials.csv").is_file()


def test_resuming_with_another_traffic_mix_is_refused_and_leaves_the_study_intact(tmp_path, models, capsys):
    db = tmp_path / "j.db"
    study = optuna.create_study(study_name="j", storage=f"sqlite:///{db}", direction="maximize")
    shas = {name: inspect_model(models[name], cache=cache_dir()).sha256 for name in ("mlp", "cnn")}
    study.set_user_attr("models", shas)
    study.set_user_attr("traffic", {"mlp": 3.0, "cnn": 1.0})
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    args = [
        "study",
        "--model",
        str(models["mlp"]),
        "--model",
        str(models["cnn"]),
        "--shape",
        "cnn.image:3,32,32",
    ]
    code = main([*args, "--traffic", "mlp=1,cnn=1", "--study-name", "j", "--storage", f"sqlite:///{db}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 6 and len(err) == 1 and "was run with the traffic mix mlp=3, cnn=1" in err[0], err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


@pytest.mark.server
def test_one_ensemble_alone_is_tuned_as_its_steps(tmp_path, ensemble_repo):
    storage = f"sqlite:///{tmp_path}/one.db"
    args = [
        "study",
        "--model",
        str(ensemble_repo / "pipeline"),
        "--latency-budget-ms",
        "300",
        "--budget",
        "1",
    ]
    assert (
        main([*args, "--study-name", "one", "--storage", storage, "--window-s", "0.2", "--warmup-s", "0.1"])
        == 0
    )
    study = optuna.load_study(study_name="one", storage=storage)
    assert study.user_attrs["ensembles"] == {"pipeline": ["pre", "head"]}
    (trial,) = [t for t in study.trials if t.user_attrs.get("levels")]
    assert set(trial.user_attrs["configs"]) == {"pre", "head", "pipeline"}
