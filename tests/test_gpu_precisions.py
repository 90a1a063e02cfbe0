"""What each GPU provider serves for fp16 and int8, and the accuracy guard per provider.

No GPU runs here: CUDA and TensorRT do not load, so the guard falls back to the CPU and says so. What is
checked: the CUDA provider's fp16 is the file made after the transformer fusions (as ONNX Runtime's
transformer tools make it), TensorRT's fp16 its own FP16 mode on the fp32 file; a precision refused on one
provider and kept on the other is never served on the one that refused it (a real study on the embedded
Triton, its refusal given by a stand-in for the GPU-only guard); the TensorRT engines a load built are
seen in the engine cache.
"""

from __future__ import annotations

from dataclasses import replace

import onnx
import optuna
import pytest
from onnx import TensorProto

from optimizer.config.render import render_config
from optimizer.config.space import Candidate, load_space
from optimizer.model.accuracy import TENSORRT_MODES, AccuracyGuard, check_variant
from optimizer.model.intake import inspect_model, resolve_shapes, synthetic_inputs
from optimizer.model.variants import (
    FP16_FUSED,
    config_files,
    precision_of_file,
    recipe_of_file,
    variant_path,
)
from optimizer.paths import cache_dir
from optimizer.report.data import precision_rows
from optimizer.study import one_model
from optimizer.study.precisions import accurate_precisions, guard_refusals, refused_providers
from optimizer.study.run import QuietReporter, run_study
from optimizer.study.trial_rules import tensorrt_engines
from studies import load_study, study_settings

ENCODER_SHAPES = {"input_ids": (16,), "attention_mask": (16,)}


@pytest.fixture(scope="module")
def encoder(models):
    info = inspect_model(models["encoder"])
    shapes = resolve_shapes(info, ENCODER_SHAPES)
    samples = [synthetic_inputs(info, shapes, 1, seed=seed) for seed in range(8)]
    return info, shapes, samples


def test_cuda_serves_fp16_made_after_the_transformer_fusions_and_tensorrt_its_own_fp16_mode(encoder):
    info, shapes, samples = encoder
    cuda = render_config(info, Candidate(provider="cuda", precision="fp16", max_batch_size=8), model_name="e")
    assert cuda.default_model_filename == "model.fp16-fused.onnx"
    (served,) = config_files(info, cuda, cache_dir()).values()  # the export finds the same file
    assert served == variant_path(info, "fp16", cache_dir(), FP16_FUSED)
    assert (precision_of_file(served.name), recipe_of_file(served.name)) == ("fp16", FP16_FUSED)

    graph = onnx.load(str(served)).graph
    ops = {node.op_type for node in graph.node}
    assert ops & {"SkipLayerNormalization", "BiasGelu", "FastGelu", "Attention"}  # fused first
    assert any(init.data_type == TensorProto.FLOAT16 for init in graph.initializer)  # then fp16
    # The normalisations stay fp32: every input of a fused SkipLayerNormalization is cast back to float.
    typed = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.input]}
    casts = {node.output[0] for node in graph.node if node.op_type == "Cast"}
    skip = [node for node in graph.node if node.op_type == "SkipLayerNormalization"]
    assert skip and all(
        typed.get(name) == TensorProto.FLOAT or name in casts or name in {i.name for i in graph.initializer}
        for node in skip
        for name in node.input
        if name
    )
    report = check_variant(info.path, served, samples, "fp16", 0.01, provider="cuda")
    assert report.ok and (report.provider, report.wanted) == ("cpu", "cuda")  # it runs where CUDA does not

    # TensorRT makes fp16 from the fp32 file (precision_mode FP16); the CPU keeps the plain conversion.
    trt = render_config(
        info, Candidate(provider="tensorrt", precision="fp16", max_batch_size=8), model_name="e"
    )
    cpu = render_config(info, Candidate(precision="fp16", max_batch_size=8), model_name="e")
    assert not trt.default_model_filename and cpu.default_model_filename == "model.fp16.onnx"
    assert TENSORRT_MODES["fp16"] == {"trt_fp16_enable": True, "trt_layer_norm_fp32_fallback": True}


def test_a_precision_refused_on_one_gpu_provider_is_kept_for_the_other_and_recorded_per_provider(encoder):
    info, _, samples = encoder

    class TensorrtOverflows(AccuracyGuard):
        """The real guard, except that TensorRT's FP16 mode is judged as overflowing would leave it."""

        def check(self, reference, variant, precision, provider="cpu"):
            report = super().check(reference, variant, precision, provider)
            if provider == "tensorrt" and precision == "fp16":
                return replace(report, cosine=0.5)
            return report

    notes: list[str] = []
    reporter = type("Notes", (), {"note": lambda self, message: notes.append(message)})()
    study = optuna.create_study(direction="maximize")
    settled = accurate_precisions(study, info, load_space("gpu"), TensorrtOverflows(samples, 0.01), reporter)

    record = study.user_attrs["variants"]["fp16"]
    assert "fp16" in settled.precisions and record["ok"] is True  # CUDA serves it
    assert record["providers"]["cuda"]["ok"] is True and record["providers"]["tensorrt"]["ok"] is False
    assert refused_providers(record) == ("tensorrt",)
    assert guard_refusals(study) == {("fp16", "tensorrt")}
    assert any(n.endswith("not served on tensorrt") and "outside the accuracy tolerance" in n for n in notes)
    # The report's precision table says where it is not served; the per-provider records are not figures.
    (row,) = [r for r in precision_rows((), study.user_attrs["variants"]) if r.precision == "fp16"]
    assert row.accuracy_ok is True and "(not served on tensorrt: fp16 variant outside" in row.accuracy_note
    assert "providers" not in dict(row.accuracy)
    # Resumed, the records are read back, not checked again, and give the same refusals.
    never = type("Never", (AccuracyGuard,), {"check": lambda *args: pytest.fail("checked again")})
    again = accurate_precisions(study, info, load_space("gpu"), never(samples, 0.01), QuietReporter())
    assert again.precisions == settled.precisions and guard_refusals(study) == {("fp16", "tensorrt")}


@pytest.mark.server
def test_a_trial_that_draws_a_refused_precision_and_provider_is_never_served(models, triton, tmp_path):
    # The GPU guard's refusal stands in for one on this machine's provider; the study and server are real.
    space = tmp_path / "space.yaml"
    space.write_text("precisions: [fp32, fp16]\nmax_batch_size: [1, 8]\ninstance_count: [1, 2]\n")
    settings = study_settings(models["mlp"], tmp_path, budget=6, space=str(space), seed=4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(one_model, "guard_refusals", lambda study: frozenset({("fp16", "cpu")}))
        summary = run_study(settings, target=triton)
    study = load_study(tmp_path)
    drawn = [t for t in study.trials if t.params.get("precision") == "fp16"]
    assert drawn, "the seed should have drawn fp16"
    for trial in drawn:
        assert trial.state == optuna.trial.TrialState.PRUNED and "load_s" not in trial.user_attrs
        assert trial.user_attrs["reason"] == "infeasible: fp16 on cpu broke the accuracy guard: not served"
        assert trial.constraints["latency_budget"] > 0
    assert summary.best is not None and " fp32 " in summary.best.summary


def test_the_engines_a_tensorrt_load_built_are_found_in_its_engine_cache(encoder, tmp_path):
    info, shapes, _ = encoder
    candidate = Candidate(provider="tensorrt", precision="fp16", max_batch_size=8)
    config = render_config(
        info, candidate, model_name="e", engine_cache_dir=str(tmp_path / "trt"), request_shapes=shapes
    )
    assert tensorrt_engines(config) == frozenset()  # no folder yet: nothing built
    (tmp_path / "trt").mkdir()
    (tmp_path / "trt" / "timing.cache").write_bytes(b"")  # the timing cache is not an engine
    before = tensorrt_engines(config)
    (tmp_path / "trt" / "TensorrtExecutionProvider_TRTKernel_graph_0_fp16.engine").write_bytes(b"x")
    assert before == frozenset() and {p.name for p in tensorrt_engines(config) - before} == {
        "TensorrtExecutionProvider_TRTKernel_graph_0_fp16.engine"
    }
    cuda = render_config(info, Candidate(provider="cuda", max_batch_size=8), model_name="e")
    assert tensorrt_engines(cuda) == frozenset()
