"""A memory limit on the server, as a pod's: the server and its backend stubs in a memory cgroup of their own.

A config that needs more memory than the limit is killed by the kernel; the study tells that from a crash
(the cgroup counts the kill), marks the config infeasible with its reason, restarts the server and goes on.
"""

from __future__ import annotations

import subprocess
import sys

import optuna
import pytest

from optimizer.errors import UsageError
from optimizer.model import examples
from optimizer.serving import memory_limit
from optimizer.serving.memory_limit import MemoryCgroup
from optimizer.study.storage import open_storage

pytestmark = pytest.mark.server

# One instance of this model (64 MiB of weights) fits in LIMIT_MB beside the server; two do not. The
# server's cgroup was seen charged 130 MiB with one instance (164 while loading), 300 with two.
LIMIT_MB = 220
SPACE = """\
name: memory-test
description: one instance fits the server's memory limit, two do not
device: cpu
execution_providers: [cpu]
precisions: [fp32]
max_batch_size: {choices: [1]}
preferred_batch_sizes: [[]]
max_queue_delay_us: {choices: [0]}
instance_count: {choices: [1, 2]}
intra_op_threads: {choices: [0, 1]}
oversubscribe: true
graph_levels: [default]
"""


def _can_make_cgroups() -> bool:
    try:
        MemoryCgroup(64)
    except UsageError:
        return False
    return True


@pytest.mark.skipif(not _can_make_cgroups(), reason="needs a writable memory cgroup (root)")
def test_a_config_over_the_servers_memory_limit_is_infeasible_and_the_study_goes_on(tmp_path):
    model = examples.build_mlp(tmp_path / "wide.onnx", hidden=4096)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    url = f"sqlite:///{tmp_path / 'memory.db'}"
    command = [sys.executable, "-m", "optimizer", "study", "--model", str(model), "--space", str(space)]
    command += [
        "--sampler",
        "grid",
        "--budget",
        "4",
        "--storage",
        url,
        "--study-name",
        "memory",
        "--seed",
        "1",
    ]
    command += ["--memory-limit-mb", str(LIMIT_MB), "--latency-budget-ms", "1000", "--window-s", "0.3"]
    command += ["--warmup-s", "0.1", "--concurrency", "1,2", "--stop-rule", "fixed"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    storage = open_storage(url)
    try:
        trials = optuna.load_study(study_name="memory", storage=storage).trials
    finally:
        storage.engine.dispose()
    measured = [t for t in trials if "same_config_as" not in t.user_attrs]
    over = [t for t in measured if t.params.get("instance_count") == 2]
    fits = [t for t in measured if t.params.get("instance_count", 1) == 1]
    assert over and all(t.state == optuna.trial.TrialState.PRUNED for t in over)
    for trial in over:
        assert trial.user_attrs["feasible"] is False
        assert "out of memory: the kernel killed" in trial.user_attrs["reason"]
        assert f"memory limit of {LIMIT_MB} MiB" in trial.user_attrs["reason"]
    # The server came back whole: a config that fits, measured after a kill, was measured in full.
    after = [t for t in fits if t.number > over[0].number]
    assert after and all(t.state == optuna.trial.TrialState.COMPLETE and t.value > 0 for t in after), [
        (t.number, t.state.name, t.params, t.user_attrs.get("reason")) for t in measured
    ]
    assert "Traceback" not in run.stdout + run.stderr
    leftover = list(MemoryCgroup(64).path.parent.glob("optimize-server-*"))
    assert not leftover  # each server's cgroup removed with it


def test_a_memory_limit_where_no_cgroup_can_be_made_is_one_line_before_any_work(monkeypatch):
    monkeypatch.setattr(memory_limit, "_own_cgroup", lambda: None)
    with pytest.raises(UsageError, match="needs a memory cgroup optimize may create") as failure:
        MemoryCgroup(512)
    assert "\n" not in failure.value.message and "systemd-run" in failure.value.message


def test_a_memory_limit_on_a_server_optimize_does_not_start_is_refused(tmp_path):
    from optimizer.cli import main

    code = main(["study", "--target", "remote", "--url", "localhost:8001", "--memory-limit-mb", "512"])
    assert code == 2
