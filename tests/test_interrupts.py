"""Ctrl-C or SIGTERM at every step of `optimize study`: each leaves the study resumable and no output half written.

The real command runs in this process, once per step; at that step a real signal is sent to the process
(at once inside a short write, or a moment into a longer step), as a user's Ctrl-C or a scheduler's
SIGTERM would arrive. After each: exit 130 with its line, no trial left RUNNING, no half-written variant,
repository or report file in place; the next run resumes the study where the interrupted one left it,
and the last, uninterrupted, finishes it to its budget with whole outputs.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import onnx
import optuna
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from optimizer.cli import main
from optimizer.config import repository as repository_module
from optimizer.model import examples
from optimizer.model import variants as variants_module
from optimizer.study import one_model
from optimizer.study.storage import count_finished, open_storage
from optimizer.study.trial import TrialRunner
from studies import FAST_CLI

pytestmark = pytest.mark.server

BUDGET = 3


def _signal_now(kind: int) -> None:
    os.kill(os.getpid(), kind)


_PENDING: list[threading.Timer] = []


def _signal_soon(kind: int, after_s: float = 1.0) -> None:
    timer = threading.Timer(after_s, _signal_now, (kind,))
    _PENDING.append(timer)
    timer.start()


def _disarm() -> None:
    """A signal still pending once the command ended would interrupt the test itself."""
    while _PENDING:
        _PENDING.pop().cancel()


def _once(action: Callable[[], None]) -> Callable[[], None]:
    done = []

    def run() -> None:
        if not done:
            done.append(True)
            action()

    return run


def _during_variant_building(monkeypatch, kind: int) -> None:
    """Inside the int8 conversion, after it wrote its temporary file."""
    fire = _once(lambda: _signal_now(kind))
    for name, recipe in list(variants_module.INT8_RECIPES.items()):

        def build(source, target, samples, _build=recipe.build):
            _build(source, target, samples)
            fire()

        monkeypatch.setitem(variants_module.INT8_RECIPES, name, _replace(recipe, build=build))


def _replace(recipe, **changes):
    from dataclasses import replace

    return replace(recipe, **changes)


def _during_the_budget_probes(monkeypatch, kind: int) -> None:
    original = TrialRunner.probe_baseline_p99s

    def probe(self, probes):
        _signal_soon(kind, 0.3)
        return original(self, probes)

    monkeypatch.setattr(TrialRunner, "probe_baseline_p99s", probe)


def _during_a_trial(monkeypatch, kind: int) -> None:
    original = TrialRunner.measure
    calls = []

    def measure(self, trial, config):
        calls.append(trial.number)
        if len(calls) == 2:  # the second trial, a second into its measurement
            _signal_soon(kind)
        return original(self, trial, config)

    monkeypatch.setattr(TrialRunner, "measure", measure)


def _during_the_confirmation(monkeypatch, kind: int) -> None:
    original = one_model.confirm

    def confirm(*args, **kwargs):
        _signal_soon(kind)
        return original(*args, **kwargs)

    monkeypatch.setattr(one_model, "confirm", confirm)


def _during_the_export(monkeypatch, kind: int) -> None:
    """After the model file is copied into the staging folder, before the folder is moved into place."""
    fire = _once(lambda: _signal_now(kind))
    original = repository_module.shutil.copy2

    def copy2(source, destination, **kwargs):
        result = original(source, destination, **kwargs)
        if str(source).endswith(".onnx"):
            fire()
        return result

    monkeypatch.setattr(repository_module.shutil, "copy2", copy2)


def _during_the_report(monkeypatch, kind: int) -> None:
    """Between two of the report's files."""
    import optimizer.report as report_module

    original = report_module._write_atomically
    calls = []

    def write(path, text):
        calls.append(path)
        if len(calls) == 2:
            _signal_now(kind)
        return original(path, text)

    monkeypatch.setattr(report_module, "_write_atomically", write)


STEPS = {
    "variant-building": (_during_variant_building, signal.SIGINT),
    "budget-probes": (_during_the_budget_probes, signal.SIGTERM),
    "a-trial": (_during_a_trial, signal.SIGINT),
    "confirmation": (_during_the_confirmation, signal.SIGTERM),
    "export": (_during_the_export, signal.SIGINT),
    "report": (_during_the_report, signal.SIGTERM),
}


def _check_no_half_outputs(studies: Path, cache: Path) -> None:
    assert not list(cache.rglob("*.tmp.onnx")), "a half-built variant was left in the cache"
    for variant in cache.rglob("*.onnx"):
        onnx.load(str(variant))  # whole
    for leftover in studies.rglob(".*"):
        assert not leftover.name.startswith(".mlp-"), f"a staging folder was left: {leftover}"
    for config in studies.rglob("config.pbtxt"):
        text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())  # whole
        for model in config.parent.rglob("*.onnx"):
            onnx.load(str(model))
    for page in studies.rglob("*.html"):
        assert page.read_text().rstrip().endswith("</html>"), page
    assert not [p for p in studies.rglob("*") if p.name.startswith(".") and p.is_file()], (
        "a temporary file left"
    )


# A signal can land where Python drops the KeyboardInterrupt (a garbage-collector callback) and reports it
# as unraisable; the study must stop all the same (the latch: the test below), which this test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_at_each_step_leaves_the_study_resumable_and_no_output_half_written(
    tmp_path, monkeypatch, capfd
):
    """One study interrupted at each step in turn, Ctrl-C and SIGTERM alternating: every run after the first
    resumes what the one before left, and the last finishes it."""
    # A model of its own: its int8 variant is not in the cache yet, so the study builds it.
    model = examples.build_mlp(tmp_path / "mlp.onnx", seed=11)
    studies, cache = tmp_path / "studies", Path(os.environ["OPTIMIZE_CACHE_DIR"]) / "variants"
    monkeypatch.setenv("OPTIMIZE_STUDIES_DIR", str(studies))
    url = f"sqlite:///{tmp_path / 'i.db'}"
    # No --latency-budget-ms: the default budget's probes are a step; --confirm 2: so is the confirmation.
    command = ["study", "--model", str(model), "--study-name", "i", "--storage", url, "--budget", str(BUDGET)]
    command += [*FAST_CLI, "--seed", "3", "--confirm", "2"]
    storage = open_storage(url)
    try:
        for step, (arrange, kind) in STEPS.items():
            with monkeypatch.context() as patched:
                arrange(patched, kind)
                try:
                    code = main(command)
                finally:
                    _disarm()
            err = capfd.readouterr().err
            assert code == 130, (step, err[-3000:])
            assert "interrupted" in err and "Traceback" not in err, (step, err[-3000:])
            try:
                study = optuna.load_study(study_name="i", storage=storage)
            except KeyError:
                study = None  # interrupted before the study was created: nothing to resume, nothing lost
            if study is not None:
                assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,)), step
            _check_no_half_outputs(studies, cache)

        assert main(command) == 0, capfd.readouterr().err
        study = optuna.load_study(study_name="i", storage=storage)
        assert count_finished(study) == BUDGET
        _check_no_half_outputs(studies, cache)
        assert list(studies.rglob("config.pbtxt")) and list(studies.rglob("report.html"))
    finally:
        storage.engine.dispose()


class _Garbage:
    """An object whose weakref callback sends the signal: Python then runs the handler inside the
    callback, where the KeyboardInterrupt it raises is printed as "Exception ignored" and dropped."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_interrupt_was_swallowed_still_stops_the_study(models, tmp_path, monkeypatch, capfd):
    import weakref

    original = TrialRunner.measure
    swallowed = []

    def measure(self, trial, config):
        if not swallowed:  # the first trial: the signal arrives while the garbage collector runs a callback
            garbage = _Garbage()
            swallowed.append(weakref.ref(garbage, lambda _: _signal_now(signal.SIGTERM)))
            del garbage
        return original(self, trial, config)

    monkeypatch.setattr(TrialRunner, "measure", measure)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    command = ["study", "--model", str(models["mlp"]), "--study-name", "w", "--storage", url]
    code = main([*command, "--budget", "4", "--latency-budget-ms", "200", *FAST_CLI])
    err = capfd.readouterr().err
    assert swallowed and code == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    storage = open_storage(url)
    try:
        study = optuna.load_study(study_name="w", storage=storage)
        assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        assert count_finished(study) < 4  # it stopped, it did not run on to its budget
    finally:
        storage.engine.dispose()
