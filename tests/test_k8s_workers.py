"""``optimize export --format k8s-workers``: a Job of workers that run one PostgreSQL study on a cluster,
validated against the Kubernetes API schema (kubernetes-validate), with what the study measured."""

from __future__ import annotations

import shlex

import kubernetes_validate
import pytest
import yaml
from postgres import postgres_server

from optimizer.cli import main

K8S_VERSION = "1.31"  # a version kubernetes-validate carries the schemas of


@pytest.fixture(scope="module")
def pg_study(mixed_study):
    """The shared real MLP study, moved into a fresh PostgreSQL as a team would before scaling out."""
    with postgres_server() as url:
        assert main(["migrate", "--from", mixed_study.url, "--to", url]) == 0
        yield url, mixed_study.study


def _validate(document: dict) -> None:
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_the_workers_job_validates_and_carries_the_studys_settings(pg_study, tmp_path, capsys):
    url, study = pg_study
    out = tmp_path / "k8s"
    args = ["export", "--study-name", "mixed", "--storage", url, "--format", "k8s-workers", "--out", str(out)]
    assert main([*args, "--workers", "4", "--image", "registry.example/optimize:1"]) == 0
    assert [line.removeprefix("wrote ") for line in capsys.readouterr().out.splitlines()] == [
        str(out / "job.yaml"),
        str(out / "postgres-example.yaml"),
        str(out / "Dockerfile"),
    ]
    text = (out / "job.yaml").read_text()
    job = yaml.safe_load(text)
    _validate(job)
    for document in yaml.safe_load_all((out / "postgres-example.yaml").read_text()):
        _validate(document)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] == 4
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example/optimize:1"
    # The database URL from a Secret, never in the manifest (the password least of all).
    (storage,) = [e for e in container["env"] if e["name"] == "OPTIMIZE_STORAGE"]
    assert storage["valueFrom"]["secretKeyRef"] == {"name": "optimize-db", "key": "url"}
    assert url.split("@")[0] not in text and "password" not in text.lower().split("secret")[0]
    # The study's own settings: budget, latency budget, shapes, space, levels.
    command = container["command"]
    attrs = study.user_attrs
    assert command[:2] == ["optimize", "study"] and "$(OPTIMIZE_STORAGE)" in command
    assert command[command.index("--budget") + 1] == str(attrs["budget"])
    assert float(command[command.index("--latency-budget-ms") + 1]) == pytest.approx(
        attrs["latency_budget_ms"]
    )
    assert command[command.index("--space") + 1] == attrs["space"]["name"]
    assert "--gpus" not in command and "nvidia.com/gpu" not in text  # a CPU space
    # What the study measured: its cores, and the most memory any of its servers held plus a quarter.
    resources = container["resources"]
    assert resources["requests"]["cpu"] == str(attrs["cpu_cores"])
    most = max(t.user_attrs["memory_mb"] for t in study.trials if t.user_attrs.get("memory_mb"))
    requested = int(resources["requests"]["memory"].removesuffix("Mi"))
    assert most * 1.25 <= requested < most * 1.25 + 64
    # One worker per node, the model from the PVC by default, and the comment that says so.
    anti = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert {
        "name": "models",
        "persistentVolumeClaim": {"claimName": "optimize-models", "readOnly": True},
    } in pod["volumes"]
    assert f"sharing its budget of {attrs['budget']} trials" in text
    assert "# Command: " + shlex.join(command) in text


def test_a_model_url_is_fetched_by_an_init_container(pg_study, tmp_path, capsys):
    url, _ = pg_study
    out = tmp_path / "k8s"
    args = ["export", "--study-name", "mixed", "--storage", url, "--format", "k8s-workers", "--out", str(out)]
    assert main([*args, "--model-url", "https://models.example/mlp.onnx", "--workers", "2"]) == 0
    job = yaml.safe_load((out / "job.yaml").read_text())
    _validate(job)
    (fetch,) = job["spec"]["template"]["spec"]["initContainers"]
    assert fetch["command"][-1] == "https://models.example/mlp.onnx"
    assert {"name": "models", "emptyDir": {}} in job["spec"]["template"]["spec"]["volumes"]
    capsys.readouterr()


def test_a_study_outside_postgresql_is_one_line(mixed_study, tmp_path, capsys):
    args = ["export", "--study-name", "mixed", "--storage", mixed_study.url, "--format", "k8s-workers"]
    assert main([*args, "--out", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert "share the study through PostgreSQL" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "k").exists()
