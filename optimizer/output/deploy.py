"""Deployment manifests for an exported model repository: Azure ML and KServe, both serving it with Triton.

``triton`` is the model repository alone (:mod:`optimizer.output.export`). ``azureml`` and ``kserve`` write the
repository under ``<out>/models/`` and their manifests beside it:

- ``azureml``: ``endpoint.yml`` (managed online endpoint) and ``deployment.yml`` (managed online
  deployment of a model of type ``triton_model`` whose path is ``./models``), as in Azure ML's no-code
  Triton examples: ``az ml online-endpoint create -f endpoint.yml``, then
  ``az ml online-deployment create -f deployment.yml --all-traffic``.
- ``kserve``: ``inferenceservice.yaml``, an ``InferenceService`` whose predictor serves the
  ``triton`` model format from ``storageUri`` (upload ``models/`` there first).

Both carry what the config was tuned for (:class:`Sizing`): the cores the study measured on and the
memory its server held under load as CPU and memory requests, the requests in flight per server where p99
stayed within the budget as Azure ML's ``max_concurrent_requests_per_instance`` and KServe's autoscaling
target, and with ``--rps`` the replica count the plan (:mod:`optimizer.output.plan`) chose. A comment on
top of each file says where each number came from.

Manifests are built as plain data by pure functions, written with ``yaml.safe_dump`` and parsed back to
check their required keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.config.render import config_from_pbtxt
from optimizer.errors import OptimizeError, StudyError, UsageError
from optimizer.output.export import choose_trial
from optimizer.output.formats import FORMATS
from optimizer.output.plan import DEFAULT_HEADROOM, Capacity, Plan, make_plan
from optimizer.study.results import export_trial
from optimizer.study.storage import stored_study

__all__ = [
    "FORMATS",
    "Deployment",
    "Sizing",
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
# Azure's compute-optimized Fsv2 sizes, (vCPUs, GiB): the smallest that holds the measured cores and memory.
AZUREML_CPU_SIZES = ((2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (48, 96), (64, 128), (72, 144))
MEMORY_MARGIN = 1.25  # requests: the resident memory measured under load, plus a quarter
MEMORY_LIMIT_FACTOR = 2  # limits: twice the request (a burst or a larger batch must not be killed)
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


def memory_request_mi(memory_mb: float | None) -> int | None:
    """A memory request in MiB: the measured resident memory plus a margin, in 64 MiB steps."""
    if not memory_mb:
        return None
    return int(math.ceil(memory_mb * MEMORY_MARGIN / 64) * 64)


@dataclass(frozen=True)
class Sizing:
    """What a deployment file carries of the study's measurements, and where each number came from."""

    cores: int | None = None  # the CPU cores the study measured on
    memory_mb: float | None = None  # the server's resident memory under the measured load
    concurrency: int | None = None  # requests in flight per server with p99 within the budget
    throughput: float | None = None  # inf/s per server at that load, within the budget
    p99_ms: float | None = None  # at that load
    replicas: int = 1  # servers at the peak (--rps), else 1
    min_replicas: int | None = None  # servers at the average traffic (--average-rps)
    headroom: float = DEFAULT_HEADROOM
    rate_scaling: bool = False  # an open-loop study: scale on requests/s, not in-flight requests
    notes: tuple[str, ...] = field(default=())  # the comment lines: each number and its origin

    @property
    def memory_request_mi(self) -> int | None:
        return memory_request_mi(self.memory_mb)

    @property
    def scale_target(self) -> int | None:
        """KServe's target per replica: the measured concurrency (or rate) less the headroom, at least 1."""
        measured = self.throughput if self.rate_scaling else self.concurrency
        if not measured:
            return None
        return max(1, int(measured * (1 - self.headroom)))


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
    max_concurrent_requests: int | None = None,
) -> dict[str, Any]:
    """An Azure ML managed online deployment of a Triton-format model (no scoring script, no environment).

    Args:
        endpoint_name: The endpoint the deployment belongs to.
        model_name: The Triton model's name (the directory inside the repository).
        gpu: Whether the config's instance group runs on a GPU (picks the default instance type).
        repository: The model repository's path, relative to the deployment YAML.
        instance_type: The VM size; default a CPU or GPU size by ``gpu``.
        instance_count: How many VMs serve the deployment.
        max_concurrent_requests: Requests in flight per VM (Azure ML's default is 1: one at a time).
    """
    if instance_count < 1:
        raise UsageError(f"instance count must be at least 1, got {instance_count}")
    deployment = {
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
    if max_concurrent_requests is not None:
        deployment["request_settings"] = {"max_concurrent_requests_per_instance": max_concurrent_requests}
    return deployment


def azureml_cpu_instance(cores: int | None, memory_mb: float | None) -> str:
    """The smallest Fsv2 size with at least ``cores`` vCPUs and room for ``memory_mb`` (default F4s_v2)."""
    if not cores:
        return AZUREML_CPU_INSTANCE
    for vcpus, gib in AZUREML_CPU_SIZES:
        if vcpus >= cores and gib * 1024 >= (memory_mb or 0) * MEMORY_LIMIT_FACTOR:
            return f"Standard_F{vcpus}s_v2"
    return f"Standard_F{AZUREML_CPU_SIZES[-1][0]}s_v2"


def kserve_inference_service(
    service_name: str,
    *,
    gpu: bool,
    storage_uri: str = KSERVE_STORAGE_PLACEHOLDER,
    sizing: Sizing | None = None,
) -> dict[str, Any]:
    """A KServe ``InferenceService`` serving a Triton model repository with the Triton runtime.

    Args:
        service_name: The InferenceService's name (a DNS label).
        gpu: Whether to ask for one NVIDIA GPU.
        storage_uri: Where the model repository (the ``models/`` directory) is uploaded.
        sizing: The study's figures: CPU and memory requests, replicas and the autoscaling target.
    """
    model: dict[str, Any] = {
        "modelFormat": {"name": "triton"},
        "protocolVersion": "v2",
        "runtimeVersion": TRITON_RUNTIME_VERSION,
        "storageUri": storage_uri,
    }
    resources = _kserve_resources(sizing or Sizing(), gpu)
    if resources:
        model["resources"] = resources
    predictor: dict[str, Any] = {}
    if sizing is not None:
        predictor["minReplicas"] = sizing.min_replicas or sizing.replicas
        predictor["maxReplicas"] = sizing.replicas
        if sizing.scale_target is not None:
            predictor["scaleMetric"] = "rps" if sizing.rate_scaling else "concurrency"
            predictor["scaleTarget"] = sizing.scale_target
    predictor["model"] = model
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": service_name},
        "spec": {"predictor": predictor},
    }


def _kserve_resources(sizing: Sizing, gpu: bool) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if sizing.cores:
        requests["cpu"] = limits["cpu"] = str(sizing.cores)
    if sizing.memory_request_mi:
        requests["memory"] = f"{sizing.memory_request_mi}Mi"
        limits["memory"] = f"{sizing.memory_request_mi * MEMORY_LIMIT_FACTOR}Mi"
    if gpu:
        limits["nvidia.com/gpu"] = 1
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


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
    fmt: str,
    out_dir: Path,
    config: Any,
    *,
    origin: str = "",
    gpu: bool | None = None,
    sizing: Sizing | None = None,
    instance_type: str | None = None,
) -> tuple[Path, ...]:
    """Write the manifests of ``fmt`` into ``out_dir`` for the Triton ``ModelConfig`` ``config``.

    ``gpu`` (default: whether ``config`` runs on a GPU) picks the instance type; a repository of several
    models passes a config that only names the deployment, and whether any of its models uses a GPU.
    ``sizing`` carries the study's figures into the files (none: the files assume nothing measured).
    """
    gpu = uses_gpu(config) if gpu is None else gpu
    header = "\n".join(
        [f"Written by optimize{' from ' + origin if origin else ''}.", *(sizing.notes if sizing else ())]
    )
    if fmt == "azureml":
        endpoint = resource_name(config.name, 32)
        return (
            write_manifest(
                out_dir / "endpoint.yml", azureml_endpoint(endpoint), AZUREML_ENDPOINT_KEYS, header
            ),
            write_manifest(
                out_dir / "deployment.yml",
                azureml_deployment(
                    endpoint,
                    config.name,
                    gpu=gpu,
                    instance_type=instance_type
                    or (
                        None
                        if gpu or sizing is None
                        else azureml_cpu_instance(sizing.cores, sizing.memory_mb)
                    ),
                    instance_count=sizing.replicas if sizing else 1,
                    max_concurrent_requests=_in_flight(sizing),
                ),
                AZUREML_DEPLOYMENT_KEYS,
                header,
            ),
        )
    if fmt == "kserve":
        note = (
            f"{header}\nUpload {REPOSITORY_DIR}/ (the Triton model repository) and set storageUri to its URI."
        )
        service = kserve_inference_service(resource_name(config.name, 45), gpu=gpu, sizing=sizing)
        return (write_manifest(out_dir / "inferenceservice.yaml", service, KSERVE_KEYS, note),)
    return ()


def _in_flight(sizing: Sizing | None) -> int | None:
    """Requests in flight per instance: the measured concurrency, or for a study by request rate the
    rate times its p99 (Little's law, with p99 as a bound on the time a request stays)."""
    if sizing is None:
        return None
    if sizing.concurrency:
        return sizing.concurrency
    if sizing.throughput and sizing.p99_ms:
        return max(1, math.ceil(sizing.throughput * sizing.p99_ms / 1000))
    return None


def export_deployment(
    study_name: str,
    out_dir: Path,
    *,
    fmt: str = "triton",
    trial: int | None = None,
    storage: str | None = None,
    rps: float | None = None,
    average_rps: float | None = None,
    headroom: float = DEFAULT_HEADROOM,
    instance_type: str | None = None,
) -> Deployment:
    """Export a trial (default: the best feasible) of a stored study in deployment format ``fmt``.

    Args:
        study_name: The study to export from.
        out_dir: For ``triton``, the model repository; otherwise the directory holding the
            manifests and the repository ``models/``.
        fmt: One of ``triton``, ``azureml``, ``kserve``.
        trial: The trial number; default the best feasible trial.
        storage: The study's storage URL; default ``studies/<study>.db``.
        rps: The peak traffic the deployment is sized for (replicas); default one replica.
        average_rps: The average traffic: the replicas an autoscaler keeps at least.
        headroom: The share of each server's measured throughput kept spare.
        instance_type: The Azure ML VM size; default the smallest holding the measured cores.

    Raises:
        UsageError: for an unknown format, or sizing options without a deployment format.
        StudyError: if the study or the trial does not exist.
    """

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "k8s-workers":
        raise UsageError("k8s-workers writes a Job, not a repository: use export_workers")
    if fmt == "triton" and (rps is not None or average_rps is not None or instance_type is not None):
        raise UsageError(
            "--rps, --average-rps and --instance-type size deployment files: add --format azureml or kserve"
        )
    with stored_study(study_name, storage) as study:
        chosen = choose_trial(study, trial)
        sizing = (
            None
            if fmt == "triton"
            else _sizing_or_note(study, chosen, fmt, rps, average_rps, headroom, instance_type)
        )
        repository = out_dir if fmt == "triton" else out_dir / REPOSITORY_DIR
        model_dir = export_trial(study, chosen, repository)
    origin = f"study {study_name!r}"
    if (model_dir / "config.pbtxt").is_file():
        config = config_from_pbtxt((model_dir / "config.pbtxt").read_text())
        manifests = write_manifests(
            fmt, out_dir, config, origin=origin, sizing=sizing, instance_type=instance_type
        )
        return Deployment(fmt, model_dir, manifests)
    # A joint study's repository: one deployment named after the study, serving every model in it.
    configs = [config_from_pbtxt(p.read_text()) for p in sorted(model_dir.glob("*/config.pbtxt"))]
    named = mc.ModelConfig(name=study_name)
    gpu = any(uses_gpu(config) for config in configs)
    manifests = write_manifests(
        fmt, out_dir, named, origin=origin, gpu=gpu, sizing=sizing, instance_type=instance_type
    )
    return Deployment(fmt, model_dir, manifests)


def _sizing_or_note(study, chosen, fmt, rps, average_rps, headroom, instance_type) -> Sizing:
    """The deployment's sizing; a trial over budget exports as it is, unsized, unless traffic was asked for."""
    try:
        return deployment_sizing(
            study,
            chosen,
            fmt,
            rps=rps,
            average_rps=average_rps,
            headroom=headroom,
            instance_type=instance_type,
        )
    except StudyError as exc:
        if rps is not None:
            raise
        return Sizing(notes=(f"Not sized from the study's figures: {exc}.",))


def deployment_sizing(
    study,
    trial,
    fmt: str,
    *,
    rps: float | None = None,
    average_rps: float | None = None,
    headroom: float = DEFAULT_HEADROOM,
    instance_type: str | None = None,
) -> Sizing:
    """The study's figures for ``trial``'s deployment in ``fmt``, each with the line saying where it came from.

    Raises:
        StudyError: when the trial met the latency budget at no load it was measured at.
    """
    if rps is None and average_rps is not None:
        raise UsageError("--average-rps sizes the replicas an autoscaler keeps: give the peak with --rps too")
    plan = make_plan(study, rps or 1.0, average_rps=average_rps, headroom=headroom, exported=trial.number)
    best = plan.sizings[0]
    capacity: Capacity = best.capacity
    cores = study.user_attrs.get("cpu_cores") or (study.user_attrs.get("hardware") or {}).get("cores")
    sizing = Sizing(
        cores=cores,
        memory_mb=capacity.memory_mb,
        concurrency=capacity.concurrency,
        throughput=capacity.throughput_per_server,
        p99_ms=capacity.p99_ms,
        replicas=best.servers if rps is not None else 1,
        min_replicas=best.servers_at_average,
        headroom=headroom,
        rate_scaling=capacity.concurrency is None,
    )
    return replace(sizing, notes=_sizing_notes(study, plan, sizing, fmt, instance_type))


def _sizing_notes(study, plan: Plan, sizing: Sizing, fmt: str, instance_type: str | None) -> tuple[str, ...]:
    """The comment lines of ``fmt``'s files: each number the study gave them, and where it came from."""
    capacity = plan.sizings[0].capacity
    budget = (
        "every model's budget"
        if math.isinf(plan.latency_budget_ms)
        else f"the {plan.latency_budget_ms:g} ms budget"
    )
    measured = (
        f"{capacity.throughput_per_server:,.1f} inf/s with p99 {capacity.p99_ms:.1f} ms at {capacity.load} "
        f"({capacity.basis})"
    )
    in_flight = _in_flight(sizing)
    in_flight_origin = (
        f"the load at which p99 stayed within {budget}: {measured}"
        if sizing.concurrency
        else f"{measured} x p99 (Little's law)"
    )
    sized = plan.rps != 1.0 or sizing.replicas != 1
    replicas_origin = (
        f"{plan.rps:,.0f} inf/s at the peak / ({capacity.throughput_per_server:,.1f} inf/s per server x "
        f"{1 - plan.headroom:.0%}); optimize plan --study-name {study.study_name} --rps {plan.rps:g} compares "
        "the other configs"
        if sized
        else "give --rps (the peak traffic) to size the deployment for your traffic"
    )
    notes = [f"Sized from trial #{capacity.trial} ({capacity.config}), measured on {plan.server}:"]
    if fmt == "azureml":
        if instance_type is None and sizing.cores:
            notes.append(
                f"  instance_type: the smallest Fsv2 size with the {sizing.cores} cores the study measured on"
                + (f" and twice the {sizing.memory_mb:,.0f} MiB its server held" if sizing.memory_mb else "")
                + "; the config's instances and threads assume those cores."
            )
        notes.append(f"  instance_count {sizing.replicas}: {replicas_origin}.")
        if in_flight is not None:
            notes.append(f"  max_concurrent_requests_per_instance {in_flight}: {in_flight_origin}.")
        return tuple(notes)
    if sizing.cores:
        notes.append(
            f"  cpu {sizing.cores}: the cores the study measured on; the config's instances and threads assume them."
        )
    if sizing.memory_request_mi:
        notes.append(
            f"  memory {sizing.memory_request_mi}Mi requested, {sizing.memory_request_mi * MEMORY_LIMIT_FACTOR}Mi "
            f"limit: the server's resident memory under that load, {sizing.memory_mb:,.0f} MiB, plus "
            f"{MEMORY_MARGIN - 1:.0%}; twice that as the limit."
        )
    notes.append(f"  maxReplicas {sizing.replicas}: {replicas_origin}.")
    if sizing.min_replicas is not None:
        notes.append(
            f"  minReplicas {sizing.min_replicas}: {plan.average_rps:,.0f} inf/s on average, the same way."
        )
    if sizing.scale_target is not None:
        unit = "requests/s" if sizing.rate_scaling else "requests in flight"
        measured_per_server = (
            f"{in_flight} in flight" if not sizing.rate_scaling else f"{sizing.throughput:,.1f} inf/s"
        )
        notes.append(
            f"  scaleTarget {sizing.scale_target} {unit} per replica: {1 - plan.headroom:.0%} of the "
            f"{measured_per_server} measured per server ({in_flight_origin})."
        )
    return tuple(notes)
