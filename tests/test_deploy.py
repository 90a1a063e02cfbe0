"""``optimize export --format triton|azureml|kserve``: the repository plus manifests that parse back."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.cli import main
from optimizer.config.render import config_from_json, config_from_pbtxt
from optimizer.errors import OptimizeError
from optimizer.measurement.levels import MeasureSettings
from optimizer.output.deploy import (
    AZUREML_GPU_INSTANCE,
    KSERVE_STORAGE_PLACEHOLDER,
    TRITON_RUNTIME_VERSION,
    azureml_deployment,
    kserve_inference_service,
    resource_name,
    write_manifest,
    write_manifests,
)
from optimizer.study.results import best_trial
from optimizer.study.run import run_study
from optimizer.study.settings import StudySettings
from studies import NO_CONFIRMATION

FAST = MeasureSettings(warmup_s=0.1, window_s=0.3, min_requests=10, max_window_s=1.0, rule="fixed")


@pytest.fixture(scope="module")
def stored(models, triton, tmp_path_factory) -> tuple[str, optuna.Study]:
    """A real two-trial study of the MLP; returns its storage URL and the study."""
    root = tmp_path_factory.mktemp("deploy-study")
    settings = StudySettings(
        model_path=models["mlp"],
        budget=2,
        latency_budget_ms=200.0,
        study_name="dep",
        output_dir=root,
        concurrency=(1, 2),
        seed=1,
        measure=FAST,
        search=NO_CONFIRMATION,
    )
    run_study(settings, target=triton)
    url = f"sqlite:///{root}/dep.db"
    return url, optuna.load_study(study_name="dep", storage=url)


def _export(stored, out: Path, fmt: str, capsys) -> list[str]:
    url, _ = stored
    assert main(["export", "--study-name", "dep", "--storage", url, "--out", str(out), "--format", fmt]) == 0
    return [line.removeprefix("wrote ") for line in capsys.readouterr().out.splitlines()]


def _assert_is_the_best_trial(model_dir: Path, study: optuna.Study) -> None:
    config = config_from_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config == config_from_json(best_trial(study).user_attrs["config"])
    assert (model_dir / "1" / (config.default_model_filename or "model.onnx")).is_file()


@pytest.mark.server
def test_triton_format_is_the_model_repository_alone(stored, tmp_path, capsys):
    written = _export(stored, tmp_path / "repo", "triton", capsys)
    assert written == [str(tmp_path / "repo" / "mlp")]
    _assert_is_the_best_trial(tmp_path / "repo" / "mlp", stored[1])
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["mlp"]


@pytest.mark.server
def test_azureml_format_writes_endpoint_and_triton_model_deployment(stored, tmp_path, capsys):
    out = tmp_path / "aml"
    written = _export(stored, out, "azureml", capsys)
    assert written == [
        str(out / "models" / "mlp"),
        str(out / "endpoint.yml"),
        str(out / "deployment.yml"),
    ]
    _assert_is_the_best_trial(out / "models" / "mlp", stored[1])
    endpoint = yaml.safe_load((out / "endpoint.yml").read_text())
    deployment = yaml.safe_load((out / "deployment.yml").read_text())
    assert endpoint["$schema"].endswith("managedOnlineEndpoint.schema.json")
    assert endpoint["name"] == deployment["endpoint_name"] == "mlp"
    assert endpoint["auth_mode"] in ("key", "aml_token")
    assert deployment["$schema"].endswith("managedOnlineDeployment.schema.json")
    assert deployment["model"]["type"] == "triton_model"
    # The model path is relative to the YAML file and holds <model>/config.pbtxt: a Triton repository.
    assert (out / deployment["model"]["path"] / "mlp" / "config.pbtxt").is_file()
    # What the config was tuned for: a VM with the study's cores, the requests in flight it was measured at.
    study, best = stored[1], best_trial(stored[1])
    cores = study.user_attrs["cpu_cores"]
    vcpus = int(deployment["instance_type"].removeprefix("Standard_F").removesuffix("s_v2"))
    assert vcpus >= cores and vcpus // 2 < cores and deployment["instance_count"] == 1  # no --rps: one
    assert deployment["request_settings"] == {
        "max_concurrent_requests_per_instance": best.user_attrs["concurrency"]
    }
    text = (out / "deployment.yml").read_text()
    assert text.startswith("# Written by optimize from study 'dep'")
    assert (
        f"max_concurrent_requests_per_instance {best.user_attrs['concurrency']}: the load at which p99"
        in text
    )


@pytest.mark.server
def test_kserve_format_writes_an_inference_service_for_the_triton_runtime(stored, tmp_path, capsys):
    out = tmp_path / "ks"
    written = _export(stored, out, "kserve", capsys)
    assert written == [str(out / "models" / "mlp"), str(out / "inferenceservice.yaml")]
    _assert_is_the_best_trial(out / "models" / "mlp", stored[1])
    service = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    assert service["metadata"]["name"] == "mlp"
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["protocolVersion"] == "v2"
    assert (
        model["runtimeVersion"] == TRITON_RUNTIME_VERSION
        and model["storageUri"] == KSERVE_STORAGE_PLACEHOLDER
    )
    # A CPU config asks for no GPU, and for the study's cores and the memory its server held, plus a margin.
    best = best_trial(stored[1])
    assert "nvidia.com/gpu" not in model["resources"]["limits"]
    assert model["resources"]["requests"]["cpu"] == str(stored[1].user_attrs["cpu_cores"])
    requested = int(model["resources"]["requests"]["memory"].removesuffix("Mi"))
    assert best.user_attrs["memory_mb"] * 1.25 <= requested < best.user_attrs["memory_mb"] * 1.25 + 64
    assert service["spec"]["predictor"]["maxReplicas"] == 1  # no --rps: one replica
    assert service["spec"]["predictor"]["scaleMetric"] == "concurrency"
    comments = [
        line for line in (out / "inferenceservice.yaml").read_text().splitlines() if line.startswith("#")
    ]
    assert "set storageUri" in comments[-1]


@pytest.mark.server
def test_unknown_format_is_one_line_and_writes_nothing(stored, tmp_path, capsys):
    url, _ = stored
    code = main(
        [
            "export",
            "--study-name",
            "dep",
            "--storage",
            url,
            "--out",
            str(tmp_path / "x"),
            "--format",
            "helm",
        ]
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "is not one of 'triton', 'azureml', 'kserve'" in lines[0]
    assert not (tmp_path / "x").exists()


def _gpu_config() -> mc.ModelConfig:
    config = mc.ModelConfig(name="Big_Model.v2", backend="onnxruntime", max_batch_size=8)
    config.instance_group.add(count=2, kind=mc.ModelInstanceGroup.KIND_GPU)
    return config


def test_gpu_config_gets_a_gpu_instance_type_and_a_gpu_limit(tmp_path):
    paths = write_manifests("azureml", tmp_path, _gpu_config()) + write_manifests(
        "kserve", tmp_path, _gpu_config()
    )
    assert [p.name for p in paths] == ["endpoint.yml", "deployment.yml", "inferenceservice.yaml"]
    deployment = yaml.safe_load((tmp_path / "deployment.yml").read_text())
    assert (
        deployment["instance_type"] == AZUREML_GPU_INSTANCE and deployment["endpoint_name"] == "big-model-v2"
    )
    service = yaml.safe_load((tmp_path / "inferenceservice.yaml").read_text())
    assert service["spec"]["predictor"]["model"]["resources"] == {"limits": {"nvidia.com/gpu": 1}}


def test_pure_builders_take_explicit_choices():
    deployment = azureml_deployment("ep", "m", gpu=False, instance_type="Standard_DS3_v2", instance_count=3)
    assert deployment["instance_type"] == "Standard_DS3_v2" and deployment["instance_count"] == 3
    service = kserve_inference_service("svc", gpu=False, storage_uri="gs://bucket/models")
    assert service["spec"]["predictor"]["model"]["storageUri"] == "gs://bucket/models"


@pytest.mark.parametrize(
    ("model_name", "limit", "expected"),
    [
        ("mlp", 32, "mlp"),
        ("My_Model.v2", 32, "my-model-v2"),
        ("1st", 32, "m-1st"),
        ("x", 32, "x-model"),
        ("a" * 40, 32, "a" * 32),
        ("__", 32, "m-model"),
    ],
)
def test_resource_names_follow_the_cloud_naming_rules(model_name, limit, expected):
    name = resource_name(model_name, limit)
    assert name == expected
    assert 3 <= len(name) <= limit and name[0].isalpha() and name[-1].isalnum()


def test_a_manifest_missing_a_required_key_is_refused(tmp_path):
    with pytest.raises(OptimizeError, match="lacks required key.*model.path"):
        write_manifest(tmp_path / "d.yml", {"model": {"type": "triton_model"}}, ["model.type", "model.path"])
