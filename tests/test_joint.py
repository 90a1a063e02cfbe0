"""Several models tuned together: the models file, the mixed load, a joint study on the real server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import optuna
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from optimizer.cli import main
from optimizer.errors import UsageError
from optimizer.measurement.levels import LevelResult, MeasureSettings
from optimizer.measurement.mixed import mix_throughput, shares_of, split_clients
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.output.serve import serving
from optimizer.study.joint import JointSettings, run_joint_study
from optimizer.study.mix import load_models_file

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


def test_clients_follow_the_traffic_mix_and_every_model_gets_one():
    shares = shares_of({"a": 3, "b": 1})
    assert shares == {"a": 0.75, "b": 0.25}
    assert split_clients(8, shares) == {"a": 6, "b": 2}
    assert split_clients(4, shares) == {"a": 3, "b": 1}
    assert split_clients(2, shares) == {"a": 1, "b": 1}  # b keeps one client even below its share


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
    settings = JointSettings(
        models=entries, budget=3, study_name="joint", output_dir=tmp_path, seed=0, measure=FAST, levels=(1, 2)
    )
    summary = run_joint_study(settings, target=triton)
    study = optuna.load_study(study_name="joint", storage=f"sqlite:///{tmp_path}/joint.db")
    assert study.user_attrs["latency_budgets_ms"] == {"mlp": 200.0, "cnn": 300.0}
    assert study.user_attrs["traffic"] == {"mlp": 3.0, "cnn": 1.0}
    measured = [t for t in study.trials if t.state.is_finished() and not t.user_attrs.get("oversubscribed")]
    assert summary.finished == len(measured) == 3
    assert measured[0].user_attrs["baseline"] is True
    for trial in measured:
        assert set(trial.user_attrs["configs"]) == {"mlp", "cnn"}  # both loaded, every trial
        for level in trial.user_attrs.get("levels", []):
            assert set(level["models"]) == {"mlp", "cnn"}  # both measured, at once
            assert level["clients"]["mlp"] >= level["clients"]["cnn"] >= 1  # in the 3:1 mix
            assert all(m["throughput"] > 0 for m in level["models"].values())
    best = next(t for t in measured if t.number == summary.best_trial)
    for name, figures in best.user_attrs["best_level"]["models"].items():
        assert figures["p99_ms"] <= study.user_attrs["latency_budgets_ms"][name]  # each budget respected
    assert summary.best_throughput == pytest.approx(best.value)
    assert summary.bound_by and set(summary.per_model) == {"mlp", "cnn"}
    # Both models are on the server together, and the exported repository holds both.
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    assert client.is_model_ready("mlp") and client.is_model_ready("cnn")
    client.close()
    repository = summary.repository
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
    again = run_joint_study(
        JointSettings(
            models=entries, budget=4, study_name="joint", output_dir=tmp_path, measure=FAST, levels=(1, 2)
        ),
        target=triton,
    )
    assert again.finished == 4
