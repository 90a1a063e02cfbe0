"""Deployment manifests for an exported model repository: Azure ML and KServe, both serving it with Triton.

``triton`` is the model repository alone (:mod:`optimizer.output.export`). ``azureml`` and ``kserve`` write the
repository under ``<out>/models/`` and their manifests beside it:

- ``azureml``: ``endpoint.yml`` (managed online endpoint) and ``deployment.yml`` (managed online
  deployment of a model of type ``triton_model`` whose path is ``./models``), as in Azure ML's no-code
  Triton examples: ``az ml online-endpoint create -f endpoint.yml``, then
  ``az ml online-deployment create -f deployment.yml --all-traffic``.
- ``kserve``: ``inferenceservice.yaml``, an ``InferenceService`` whose predictor serves the
  ``triton`` model format from ``storageUri`` (upload ``models/`` there first).

Manifests are built as plain data by pure functions, written with ``yaml.safe_dump`` and parsed back to
check their required keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.config.render import config_from_pbtxt
from optimizer.errors import OptimizeError, UsageError
from optimizer.output.export import export_from_storage
from optimizer.output.formats import FORMATS

__all__ = [
    "FORMATS",
    "Deployment",
    "azureml_deployment",
    "azureml_endpoint",
    "export_deployment",
    "kserve_inference_service",
    "resource_name",
    "uses_gpu",
    "write_manifest",
    "write_manifests",
]

REPOSITORY_DIR = "models"
AZUREML_ENDPOINT_SCHEMA = "https://azuremlschemas.azureedge.net/latest/managedOnlineEndpoint.schema.json"
AZUREML_DEPLOYMENT_SCHEMA = "https://azuremlschemas.azureedge.net/latest/managedOnlineDeployment.schema.json"
AZUREML_CPU_INSTANCE = "Standard_F4s_v2"
AZUREML_GPU_INSTANCE = "Standard_NC6s_v3"
# The NGC Triton container release that carries Triton 2.51, the server the study measured with.
TRITON_RUNTIME_VERSION = "24.10-py3"
KSERVE_STORAGE_PLACEHOLDER = "s3://CHANGE-ME/models"

AZUREML_ENDPOINT_KEYS = ("$schema", "name", "auth_mode")
AZUREML_DEPLOYMENT_KEYS = (
    "$schema",
    "name",
    "endpoint_name",
    "model.name",
    "model.path",
    "model.type",
    "instance_type",
    "instance_count",
)
KSERVE_KEYS = (
    "apiVersion",
    "kind",
    "metadata.name",
    "spec.predictor.model.modelFormat.name",
    "spec.predictor.model.storageUri",
    "spec.predictor.model.protocolVersion",
)


@dataclass(frozen=True)
class Deployment:
    """What ``export`` wrote: the model directory inside its repository, and the manifests."""

    format: str
    model_dir: Path
    manifests: tuple[Path, ...]


# --- manifests as data ---------------------------------------------------------------------------------


def resource_name(model_name: str, max_length: int) -> str:
    """A cloud resource name from a model name: lower-case letters, digits and '-', starting with a letter.

    >>> resource_name("My_Model.v2", 32)
    'my-model-v2'
    """
    name = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}".rstrip("-")
    name = name[:max_length].rstrip("-")
    return name if len(name) >= 3 else f"{name}-model"[:max_length]


def azureml_endpoint(endpoint_name: str) -> dict[str, Any]:
    """An Azure ML managed online endpoint (key authentication)."""
    return {"$schema": AZUREML_ENDPOINT_SCHEMA, "name": endpoint_name, "auth_mode": "key"}


def azureml_deployment(
    endpoint_name: str,
    model_name: str,
    *,
    gpu: bool,
    repository: str = f"./{REPOSITORY_DIR}",
    instance_type: str | None = None,
    instance_count: int = 1,
) -> dict[str, Any]:
    """An Azure ML managed online deployment of a Triton-format model (no scoring script, no environment).

    Args:
        endpoint_name: The endpoint the deployment belongs to.
        model_name: The Triton model's name (the directory inside the repository).
        gpu: Whether the config's instance group runs on a GPU (picks the default instance type).
        repository: The model repository's path, relative to the deployment YAML.
        instance_type: The VM size; default a CPU or GPU size by ``gpu``.
        instance_count: How many VMs serve the deployment.
    """
    if instance_count < 1:
        raise UsageError(f"instance count must be at least 1, got {instance_count}")
    return {
        "$schema": AZUREML_DEPLOYMENT_SCHEMA,
        "name": "optimized",
        "endpoint_name": endpoint_name,
        "model": {
            "name": resource_name(model_name, 255),
            "version": 1,
            "path": repository,
            "type": "triton_model",
        },
        "instance_type": instance_type or (AZUREML_GPU_INSTANCE if gpu else AZUREML_CPU_INSTANCE),
        "instance_count": instance_count,
    }


def kserve_inference_service(
    service_name: str, *, gpu: bool, storage_uri: str = KSERVE_STORAGE_PLACEHOLDER
) -> dict[str, Any]:
    """A KServe ``InferenceService`` serving a Triton model repository with the Triton runtime.

    Args:
        service_name: The InferenceService's name (a DNS label).
        gpu: Whether to ask for one NVIDIA GPU.
        storage_uri: Where the model repository (the ``models/`` directory) is uploaded.
    """
    model: dict[str, Any] = {
        "modelFormat": {"name": "triton"},
        "protocolVersion": "v2",
        "runtimeVersion": TRITON_RUNTIME_VERSION,
        "storageUri": storage_uri,
    }
    if gpu:
        model["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": service_name},
        "spec": {"predictor": {"model": model}},
    }


def uses_gpu(config: Any) -> bool:
    """Whether a Triton ``ModelConfig`` places any instance on a GPU."""
    from tritonclient.grpc import model_config_pb2 as mc

    return any(group.kind == mc.ModelInstanceGroup.KIND_GPU for group in config.instance_group)


# --- writing -------------------------------------------------------------------------------------------


def write_manifest(
    path: Path, manifest: Mapping[str, Any], required: Sequence[str], header: str = ""
) -> Path:
    """Write ``manifest`` as YAML, parse it back and check it round-trips with every ``required`` key.

    Args:
        path: The file to write.
        manifest: The manifest as plain data.
        required: Dotted key paths that must hold a non-empty value (``model.path``).
        header: Comment lines put on top of the file.
    """
    text = yaml.safe_dump(dict(manifest), sort_keys=False, default_flow_style=False)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + text)
    parsed = yaml.safe_load(path.read_text())
    if parsed != manifest:
        raise OptimizeError(f"the manifest {str(path)!r} does not read back as written")
    missing = [key for key in required if _lookup(parsed, key) in (None, "", {}, [])]
    if missing:
        raise OptimizeError(f"the manifest {str(path)!r} lacks required key(s) {', '.join(missing)}")
    return path


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return None
        data = data[part]
    return data


def write_manifests(
    fmt: str, out_dir: Path, config: Any, *, origin: str = "", gpu: bool | None = None
) -> tuple[Path, ...]:
    """Write the manifests of ``fmt`` into ``out_dir`` for the Triton ``ModelConfig`` ``config``.

    ``gpu`` (default: whether ``config`` runs on a GPU) picks the instance type; a repository of several
    models passes a config that only names the deployment, and whether any of its models uses a GPU.
    """
    gpu = uses_gpu(config) if gpu is None else gpu
    header = f"Written by optimize{' from ' + origin if origin else ''}."
    if fmt == "azureml":
        endpoint = resource_name(config.name, 32)
        return (
            write_manifest(
                out_dir / "endpoint.yml", azureml_endpoint(endpoint), AZUREML_ENDPOINT_KEYS, header
            ),
            write_manifest(
                out_dir / "deployment.yml",
                azureml_deployment(endpoint, config.name, gpu=gpu),
                AZUREML_DEPLOYMENT_KEYS,
                header,
            ),
        )
    if fmt == "kserve":
        note = (
            f"{header}\nUpload {REPOSITORY_DIR}/ (the Triton model repository) and set storageUri to its URI."
        )
        service = kserve_inference_service(resource_name(config.name, 45), gpu=gpu)
        return (write_manifest(out_dir / "inferenceservice.yaml", service, KSERVE_KEYS, note),)
    return ()


def export_deployment(
    study_name: str,
    out_dir: Path,
    *,
    fmt: str = "triton",
    trial: int | None = None,
    storage: str | None = None,
) -> Deployment:
    """Export a trial (default: the best feasible) of a stored study in deployment format ``fmt``.

    Args:
        study_name: The study to export from.
        out_dir: For ``triton``, the model repository; otherwise the directory holding the
            manifests and the repository ``models/``.
        fmt: One of ``triton``, ``azureml``, ``kserve``.
        trial: The trial number; default the best feasible trial.
        storage: The study's storage URL; default ``studies/<study>.db``.

    Raises:
        UsageError: for an unknown format.
        StudyError: if the study or the trial does not exist.
    """

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    repository = out_dir if fmt == "triton" else out_dir / REPOSITORY_DIR
    model_dir = export_from_storage(study_name, repository, trial=trial, storage=storage)
    origin = f"study {study_name!r}"
    if (model_dir / "config.pbtxt").is_file():
        config = config_from_pbtxt((model_dir / "config.pbtxt").read_text())
        return Deployment(fmt, model_dir, write_manifests(fmt, out_dir, config, origin=origin))
    # A joint study's repository: one deployment named after the study, serving every model in it.
    configs = [config_from_pbtxt(p.read_text()) for p in sorted(model_dir.glob("*/config.pbtxt"))]
    named = mc.ModelConfig(name=study_name)
    gpu = any(uses_gpu(config) for config in configs)
    return Deployment(fmt, model_dir, write_manifests(fmt, out_dir, named, origin=origin, gpu=gpu))
