"""Accuracy in the user's metric: their data, their metric, their goal.

A small extractive-QA-shaped model (token ids in, start and end logits over the sequence out, as the
walkthrough's BERT SQuAD model) with labelled spans decides its fp16 and int8 variants by an F1 goal on
the real embedded Triton; a user's own metric function is called and its number recorded.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main
from optimizer.errors import UsageError
from optimizer.model.accuracy import AccuracyGuard, compare_outputs
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.model.metrics import (
    AccuracyData,
    builtin_metrics,
    parse_goal,
    resolve_metric,
)
from optimizer.report.data import build_report_data
from studies import FAST_CLI, load_study

SEQUENCE, VOCAB, HIDDEN, SAMPLES = 48, 200, 64, 96


def build_qa_model(path: Path, seed: int = 0) -> Path:
    """Token ids [batch, sequence] -> embeddings -> two ReLU layers -> start_logits, end_logits [batch, sequence]."""
    rng = np.random.default_rng(seed)
    weights = {
        "embedding": rng.normal(0, 1, (VOCAB, HIDDEN)).astype(np.float32),
        "w1": rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, HIDDEN)).astype(np.float32),
        "b1": rng.normal(0, 0.1, HIDDEN).astype(np.float32),
        "w2": rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, HIDDEN)).astype(np.float32),
        "w3": rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, 2)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["embedded"]),
        helper.make_node("MatMul", ["embedded", "w1"], ["projected"]),
        helper.make_node("Add", ["projected", "b1"], ["biased"]),
        helper.make_node("Relu", ["biased"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["deeper"]),
        helper.make_node("Relu", ["deeper"], ["hidden2"]),
        helper.make_node("MatMul", ["hidden2", "w3"], ["logits"]),
        helper.make_node("Split", ["logits", "halves"], ["start", "end"], axis=2),
        helper.make_node("Squeeze", ["start", "last"], ["start_logits"]),
        helper.make_node("Squeeze", ["end", "last"], ["end_logits"]),
    ]
    constants = [
        numpy_helper.from_array(np.array([1, 1], np.int64), "halves"),
        numpy_helper.from_array(np.array([2], np.int64), "last"),
    ]
    graph = helper.make_graph(
        nodes,
        "qa",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQUENCE])],
        [
            helper.make_tensor_value_info("start_logits", TensorProto.FLOAT, ["batch", SEQUENCE]),
            helper.make_tensor_value_info("end_logits", TensorProto.FLOAT, ["batch", SEQUENCE]),
        ],
        [numpy_helper.from_array(array, name) for name, array in weights.items()] + constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def qa_data(model: Path, path: Path, seed: int = 1) -> Path:
    """Token ids with labelled answer spans: fp32's own best span for most samples, a shifted one for a
    few (so fp32's F1 is below 100, as on real data)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (SAMPLES, SEQUENCE), dtype=np.int64)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    start_logits, end_logits = session.run(None, {"input_ids": ids})
    spans = [
        max(
            ((s, e) for s in range(SEQUENCE) for e in range(s, min(s + 30, SEQUENCE))),
            key=lambda span, i=i: start_logits[i, span[0]] + end_logits[i, span[1]],
        )
        for i in range(SAMPLES)
    ]
    starts, ends = (np.array(column, np.int64) for column in zip(*spans))
    shifted = rng.random(SAMPLES) < 0.2
    starts[shifted] = np.maximum(starts[shifted] - 2, 0)
    np.savez(path, input_ids=ids, start_positions=starts, end_positions=ends)
    return path


@pytest.fixture(scope="module")
def qa(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qa")
    model = build_qa_model(root / "qa.onnx")
    metric = root / "mymetrics.py"
    metric.write_text(
        "import numpy as np\n\n"
        "def start_agreement(outputs, reference, data):\n"
        "    calls.append(sorted(outputs))\n"
        "    same = outputs['start_logits'].argmax(1) == reference['start_logits'].argmax(1)\n"
        "    return float(np.mean(same))\n\n"
        "calls = []\n"
    )
    return {"root": root, "model": model, "data": qa_data(model, root / "qa.npz"), "metric": metric}


# --- metrics and goals, on their own --------------------------------------------------------------------------


def test_squad_metrics_score_spans_as_the_squad_evaluation_does():
    metrics = builtin_metrics(["input_ids"])
    start = np.full((3, 10), -5.0)
    end = np.full((3, 10), -5.0)
    for row, (s, e) in enumerate([(2, 4), (1, 1), (6, 8)]):
        start[row, s] = end[row, e] = 5.0
    outputs = {"start_logits": start, "end_logits": end}
    data = {"start_positions": np.array([2, 1, 7]), "end_positions": np.array([4, 1, 9])}
    # Exact on two of three; the third predicts 6-8 against 7-9: overlap 2, precision and recall 2/3.
    assert metrics["squad_exact_match"](outputs, outputs, data) == pytest.approx(200 / 3)
    assert metrics["squad_f1"](outputs, outputs, data) == pytest.approx((1 + 1 + 2 / 3) / 3 * 100)


def test_pooled_cosine_ignores_the_padding_the_attention_mask_hides():
    metric = builtin_metrics(["input_ids", "attention_mask"])["pooled_cosine"]
    hidden = np.ones((2, 4, 3))
    noisy = hidden.copy()
    noisy[:, 2:, :] = -50.0  # only padded tokens differ
    mask = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    data = {"attention_mask": mask}
    assert metric({"h": noisy}, {"h": hidden}, data) == pytest.approx(1.0)
    assert metric({"h": noisy}, {"h": hidden}, {}) < 0.5  # unmasked, the padding counts


@pytest.mark.parametrize(
    ("text", "fp32", "value", "met"),
    [
        ("squad_f1>=85", 90.0, 85.0, True),
        ("squad_f1>=85", 90.0, 84.9, False),
        ("squad_f1>=-1%", 90.0, 89.1, True),  # at most 1% of 90 below: 89.1
        ("squad_f1>=-1%", 90.0, 89.0, False),
        ("squad_f1>=fp32-0.5", 90.0, 89.5, True),
        ("squad_f1>=fp32-0.5", 90.0, 89.4, False),
        ("max_abs_error<=0.05", 0.0, 0.04, True),
        ("max_abs_error<=0.05", 0.0, 0.06, False),
    ],
)
def test_goals_are_a_floor_or_a_loss_against_fp32_absolute_or_in_percent(text, fp32, value, met):
    goal = parse_goal(text, METRICS)
    assert goal.met(value, fp32) is met
    assert goal.met(float("nan"), fp32) is False  # a variant whose metric is not a number misses it


METRICS = builtin_metrics(["input_ids"])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max_abs_error>=fp32-0.1", "max_abs_error is better lower, so its goal is max_abs_error<="),
        ("squad_f1<=90", "squad_f1 is better higher, so its goal is squad_f1>="),
        ("squad_f1>=-1", "a negative floor reads like a loss; write squad_f1>=fp32-1"),
        ("squad_f1>=inf", "the bound must be a finite number"),
        ("squad_f1>=fp32+1", "a goal below fp32 is NAME>=fp32-X"),
        ("mine>=0.9", "add --accuracy-metric module:mine"),
    ],
)
def test_a_goal_that_points_the_wrong_way_or_reads_two_ways_is_refused(text, fragment):
    with pytest.raises(UsageError, match=re.escape(fragment)):
        parse_goal(text, METRICS)


def test_goals_relative_to_fp32_itself_are_accepted():
    assert parse_goal("squad_f1>=fp32", METRICS).bound(90.0) == 90.0
    assert parse_goal("squad_f1>=fp32-1e-3", METRICS).bound(90.0) == pytest.approx(89.999)
    assert parse_goal("max_abs_error<=fp32+0.05", METRICS).bound(0.0) == pytest.approx(0.05)


def test_the_guard_decides_by_the_goals_and_records_each_metric_beside_fp32(qa):
    info = inspect_model(qa["model"])
    samples = [synthetic_inputs(info, resolve_shapes(info, {}), 1, seed=s) for s in range(4)]
    with np.load(qa["data"]) as archive:
        data = AccuracyData(
            {"input_ids": archive["input_ids"]}, {k: archive[k] for k in archive.files[1:]}, "qa"
        )
    metric = resolve_metric(f"{qa['metric']}:start_agreement", ["input_ids"])
    f1 = resolve_metric("squad_f1", ["input_ids"])
    goal = parse_goal("squad_f1>=fp32-200", {"squad_f1": f1})
    guard = AccuracyGuard(samples, 0.01, (f1, metric), (goal,), data)
    fp32 = guard.fp32_scores(info.path)
    assert 60 < fp32["squad_f1"] < 100 and fp32["start_agreement"] == 1.0  # the labels hold some wrong spans
    report = guard.check(info.path, info.path, "fp32 copy")
    assert report.ok and report.metrics["squad_f1"] == {"fp32": fp32["squad_f1"], "variant": fp32["squad_f1"]}
    assert report.goals == (("squad_f1>=fp32-200", True),)
    assert "meets the accuracy goals: squad_f1" in report.reason() and "96 samples of qa" in report.reason()


# --- a study that judges its variants by an F1 goal --------------------------------------------------------------


@pytest.mark.server
def test_a_study_serves_only_the_variants_that_meet_an_f1_goal_and_reports_their_figures(
    qa, tmp_path, capsys
):
    space = tmp_path / "space.yaml"
    space.write_text("precisions: [fp32, fp16, int8]\nmax_batch_size: [1, 8]\ninstance_count: [1, 1]\n")
    args = [
        "study",
        "--model",
        str(qa["model"]),
        "--study-name",
        "qa",
        "--storage",
        f"sqlite:///{tmp_path / 'qa.db'}",
        "--space",
        str(space),
        "--budget",
        "4",
        "--latency-budget-ms",
        "200",
        "--starting-points",
        "variants",
        "--accuracy-data",
        str(qa["data"]),
        "--accuracy-metric",
        f"{qa['metric']}:start_agreement",
        "--accuracy-goal",
        "squad_f1>=-0.5%",
        *FAST_CLI,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    study = load_study(tmp_path, "qa")
    accuracy = study.user_attrs["accuracy"]
    assert accuracy["goals"] == ["squad_f1>=-0.5%"] and accuracy["metrics"] == ["start_agreement", "squad_f1"]
    fp32_f1 = accuracy["fp32"]["squad_f1"]
    verdicts = {}
    for precision in ("fp16", "int8"):
        record = study.user_attrs["variants"][precision]
        figures = record["metrics"]
        assert figures["squad_f1"]["fp32"] == pytest.approx(fp32_f1)
        assert 0.0 <= figures["start_agreement"]["variant"] <= 1.0  # the user's function ran on the variant
        # The verdict is the goal's, on the figures recorded: at most 0.5% of fp32's F1 lost.
        assert record["ok"] is (figures["squad_f1"]["variant"] >= fp32_f1 * (1 - 0.005) - 1e-9)
        verdicts[precision] = record["ok"]
        served = {t.params.get("precision") for t in study.trials if "sweep" in t.user_attrs}
        assert (precision in served) is record["ok"] or not record["ok"]
    assert any(verdicts.values()) and not all(verdicts.values()), verdicts  # one kept, one refused here
    refused = next(p for p, ok in verdicts.items() if not ok)
    assert all(t.params.get("precision") != refused for t in study.trials)  # never proposed
    # The summary and the report show each precision's speed beside its F1 against fp32.
    assert "per precision (best served, accuracy against fp32 on your metrics):" in out
    assert f"{refused}: refused by the accuracy guard, start_agreement" in out
    report = build_report_data(study)
    rows = {row.precision: row for row in report.precisions}
    assert dict(rows[refused].accuracy)["squad_f1"].endswith(
        f"(fp32 {fp32_f1:.4g}, {study.user_attrs['variants'][refused]['metrics']['squad_f1']['variant'] - fp32_f1:+.3g})"
    )
    assert "misses the accuracy goal squad_f1>=-0.5%" in rows[refused].accuracy_note
    # Resumed with another goal, the variants judged by the first would be wrong: refused, nothing written.
    before = (tmp_path / "qa.db").read_bytes()
    other = [a if a != "squad_f1>=-0.5%" else "squad_f1>=-5%" for a in args]
    assert main(other) == 6
    err = capsys.readouterr().err
    assert (
        "judged its variants by squad_f1>=-0.5% (with its metrics and data): resume it with the same" in err
    )
    assert (tmp_path / "qa.db").read_bytes() == before


def test_a_variant_whose_outputs_overflow_misses_every_goal_even_one_its_metric_would_pass():
    metric = builtin_metrics(["input_ids", "attention_mask"])["pooled_cosine"]
    hidden = np.ones((2, 4, 3), np.float32)
    overflowed = hidden.copy()
    overflowed[0, 0, 0] = np.inf
    assert np.isnan(metric({"h": overflowed}, {"h": hidden}, {}))  # not a perfect 1.0
    guard = AccuracyGuard(
        [], 0.01, metrics=(metric,), goals=(parse_goal("pooled_cosine>=0.5", {"pooled_cosine": metric}),)
    )
    report = replace(
        compare_outputs("fp16", [{"h": hidden}], [{"h": overflowed}], 0.01),
        metrics={"pooled_cosine": {"fp32": 1.0, "variant": float("nan")}},
        goals=(("pooled_cosine>=0.5", False),),
    )
    assert not report.ok and "has outputs that are not finite" in report.reason()
    assert guard.goals[0].met(float("nan"), 1.0) is False


def test_outputs_of_a_changing_shape_are_one_line_not_a_traceback():
    from optimizer.model.accuracy import _stack

    with pytest.raises(UsageError, match="output 'boxes' has shapes .* across the samples"):
        _stack([{"boxes": np.zeros((1, 3, 4))}, {"boxes": np.zeros((1, 5, 4))}], batching=True)
