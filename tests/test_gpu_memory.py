"""GPU memory as a measurement and a constraint, through real studies on the embedded Triton whose
/metrics text is faked to hold GPU figures (no GPU here): each config's GPU memory grows with its instances.
"""

from __future__ import annotations

import json

import optuna
import pytest

from optimizer.errors import ConfigRejected, StudyError
from optimizer.measurement.levels import MeasureSettings
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.serving.metrics import MIB, resource_usage
from optimizer.study import trial_rules
from optimizer.study.run import QuietReporter, run_study
from studies import load_study, study_settings

pytestmark = pytest.mark.server

FIXED = MeasureSettings(warmup_s=0.1, window_s=0.3, min_requests=10, max_window_s=1.0, rule="fixed")
IDLE_MB, PER_INSTANCE_MB, TOTAL_MB = 1000, 800, 16384


class FakeGpuTriton(EmbeddedTriton):
    """The real embedded Triton, its /metrics joined by one GPU whose memory in use is IDLE_MB plus
    PER_INSTANCE_MB for each instance of the config last loaded (as a model's copies take memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.instances = 0

    def load_model(self, name, config_json, files):
        seconds = super().load_model(name, config_json, files)
        self.instances = sum(g.get("count", 1) for g in json.loads(config_json).get("instance_group", []))
        return seconds

    def held(self) -> float:
        """GPU memory an unload did not give back (none: this server gives all of it back)."""
        return 0.0

    def unload_model(self, name):
        super().unload_model(name)
        self.instances = 0

    def resources(self) -> dict[str, float]:
        used = (IDLE_MB + PER_INSTANCE_MB * self.instances + self.held()) * MIB
        text = (
            "# TYPE nv_gpu_memory_used_bytes gauge\n"
            f'nv_gpu_memory_used_bytes{{gpu_uuid="GPU-fake-0"}} {used}\n'
            "# TYPE nv_gpu_memory_total_bytes gauge\n"
            f'nv_gpu_memory_total_bytes{{gpu_uuid="GPU-fake-0"}} {TOTAL_MB * MIB}\n'
        )
        return {**super().resources(), **resource_usage(text)}


def test_a_config_over_max_gpu_memory_is_infeasible_and_the_summary_says_how_many_copies_fit(
    models, tmp_path
):
    limit = IDLE_MB + 1.5 * PER_INSTANCE_MB  # one instance fits, two do not
    settings = study_settings(
        models["mlp"], tmp_path, budget=5, measure=FIXED, concurrency=(1, 2), max_gpu_memory_mb=limit, seed=3
    )
    with FakeGpuTriton() as server:
        summary = run_study(settings, target=server)
    study = load_study(tmp_path)
    measured = [t for t in study.trials if "gpu_memory_mb" in t.user_attrs]
    assert measured and study.user_attrs["gpu_memory_idle_mb"] == IDLE_MB
    for trial in measured:
        instances = trial.user_attrs["config"]["instance_group"][0].get("count", 1)
        assert trial.user_attrs["gpu_memory_mb"] == IDLE_MB + PER_INSTANCE_MB * instances
        assert trial.user_attrs["gpu_memory_total_mb"] == TOTAL_MB
        if instances > 1:
            assert trial.state == optuna.trial.TrialState.PRUNED
            assert f"broke the --max-gpu-memory-mb {limit:g} limit" in trial.user_attrs["reason"]
            assert trial.constraints["gpu_memory"] > 0
        else:
            assert trial.constraints["gpu_memory"] < 0
    assert any(t.user_attrs["config"]["instance_group"][0].get("count", 1) > 1 for t in measured), (
        "the seed should have proposed a config with two instances"
    )
    assert summary.best is not None and summary.gpu_fit is not None
    assert summary.gpu_fit.per_copy_mb == PER_INSTANCE_MB
    assert summary.gpu_fit.copies == (TOTAL_MB - IDLE_MB) // PER_INSTANCE_MB


def test_max_gpu_memory_on_a_server_that_shows_no_gpu_is_refused_before_any_trial(models, triton, tmp_path):
    settings = study_settings(models["mlp"], tmp_path, budget=2, measure=FIXED, max_gpu_memory_mb=4000)
    with pytest.raises(StudyError, match="--max-gpu-memory-mb needs the GPU memory the server reports"):
        run_study(settings, target=triton)
    assert [t.state for t in load_study(tmp_path).trials] == [optuna.trial.TrialState.WAITING]  # the baseline


def test_an_impossible_gpu_memory_limit_is_refused_before_any_trial(models, tmp_path):
    settings = study_settings(models["mlp"], tmp_path, budget=2, measure=FIXED, max_gpu_memory_mb=IDLE_MB / 2)
    with (
        FakeGpuTriton() as server,
        pytest.raises(StudyError, match="is impossible: before any model is loaded"),
    ):
        run_study(settings, target=server)


class OutOfMemoryOnThirdLoad(FakeGpuTriton):
    """Refuses its third load as ONNX Runtime's CUDA provider does when the GPU is full; counts restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = self.restarts = 0

    def load_model(self, name, config_json, files):
        self.loads += 1
        if self.loads == 3:
            raise ConfigRejected(
                "load failed for model 'model': onnxruntime: CUDA failure 2: out of memory ; GPU=0 ; "
                "expr=cudaMalloc(&p, size)"
            )
        return super().load_model(name, config_json, files)

    def restart(self) -> None:
        self.restarts += 1
        super().restart()


def test_a_load_that_runs_the_gpu_out_of_memory_is_infeasible_and_the_server_restarts(models, tmp_path):
    settings = study_settings(models["mlp"], tmp_path, budget=4, measure=FIXED, concurrency=(1, 2), seed=5)
    with OutOfMemoryOnThirdLoad() as server:
        summary = run_study(settings, target=server)
        assert server.restarts == 1  # the next trial starts on a server with its memory back
    study = load_study(tmp_path)
    (exhausted,) = [t for t in study.trials if "memory exhausted" in t.user_attrs.get("reason", "")]
    assert exhausted.state == optuna.trial.TrialState.PRUNED and exhausted.user_attrs["feasible"] is False
    assert exhausted.user_attrs["reason"].startswith("infeasible: memory exhausted loading the config")
    assert exhausted.constraints["memory"] > 0  # the sampler learns the config does not fit
    later = [t for t in study.trials if t.number > exhausted.number and t.state.is_finished()]
    assert later and all(t.state != optuna.trial.TrialState.FAIL for t in later)
    assert summary.finished == 4


def test_a_study_on_a_gpu_server_records_the_gpu_libraries_it_ran_with(models, tmp_path):
    class SeenGpu(FakeGpuTriton):
        def hardware(self):
            return {**super().hardware(), "gpu": ["NVIDIA H100 80GB HBM3"]}

    settings = study_settings(models["mlp"], tmp_path, budget=1, measure=FIXED, concurrency=(1,))
    with SeenGpu() as server:
        run_study(settings, target=server)
    recorded = load_study(tmp_path).user_attrs["gpu_libraries"]
    assert recorded["onnxruntime"] and recorded["onnxruntime_cuda"]  # onnxruntime-gpu's build, here 13.0


class KeepsMemoryAfterUnload(FakeGpuTriton):
    """Keeps LEAK_MB of each unloaded config's GPU memory until it restarts, as the ONNX Runtime backend is
    known to; counts restarts."""

    LEAK_MB = 2000

    def __init__(self) -> None:
        super().__init__()
        self.leaked = 0.0
        self.restarts = 0

    def unload_model(self, name):
        super().unload_model(name)
        self.leaked += self.LEAK_MB

    def held(self) -> float:
        return self.leaked

    def restart(self) -> None:
        self.restarts += 1
        self.leaked = 0.0
        super().restart()


class Notes(QuietReporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_a_server_whose_gpu_memory_does_not_come_back_is_restarted_before_the_next_trial(
    models, tmp_path, monkeypatch
):
    # This fake never gives the memory back: waiting the real 10 s for it before each trial tests nothing more.
    monkeypatch.setattr(trial_rules, "GPU_MEMORY_RETURN_S", 1.0)
    settings = study_settings(models["mlp"], tmp_path, budget=4, measure=FIXED, concurrency=(1, 2), seed=3)
    reporter = Notes()
    with KeepsMemoryAfterUnload() as server:
        summary = run_study(settings, reporter, target=server)
        measured = [t for t in load_study(tmp_path).trials if "gpu_memory_mb" in t.user_attrs]
        assert server.restarts == len(measured) - 1  # before every trial but the first
    restarted = [n for n in reporter.notes if "GPU memory did not come back" in n]
    assert len(restarted) == server.restarts and restarted[0] == (
        "the GPU memory did not come back after unloading the last config (2000 MiB over the idle 1000 MiB): "
        "restarting the server"
    )
    for trial in measured:  # each measured with its own memory only, never the last config's
        instances = trial.user_attrs["config"]["instance_group"][0].get("count", 1)
        assert trial.user_attrs["gpu_memory_mb"] == IDLE_MB + PER_INSTANCE_MB * instances
    assert summary.finished == 4


def test_a_server_that_gives_its_gpu_memory_back_is_not_restarted(models, tmp_path):
    class Counting(FakeGpuTriton):
        restarts = 0

        def restart(self) -> None:
            self.restarts += 1
            super().restart()

    settings = study_settings(models["mlp"], tmp_path, budget=3, measure=FIXED, concurrency=(1,), seed=3)
    with Counting() as server:
        run_study(settings, target=server)
        assert server.restarts == 0
