"""Workers of one study on Kubernetes: ``optimize export --format k8s-workers``.

Optuna is the distributed engine (README "Several machines"): every worker runs ``optimize study`` against the
study's PostgreSQL, and together they run exactly the study's ``--budget`` of trials. This module writes what
a team applies to run N such workers on a cluster, as plain data checked by the tests against the
Kubernetes API schema:

- ``job.yaml``: an Indexed ``Job`` (``parallelism`` and ``completions`` N), one pod per node (pod
  anti-affinity: two workers on one machine would measure each other's load), each pod running
  ``optimize study`` with the study's own model, shapes, space, budget and latency budget; its Triton is
  the embedded one inside the pod, on loopback only. The database URL comes from a Secret, never from
  the manifest. The model comes from a PersistentVolumeClaim or, with ``--model-url``, is fetched by an
  init container into the pod. CPU and memory requests are what the study measured: the cores it ran
  on, and the most memory any of its servers held plus a margin; a GPU space asks for one
  ``nvidia.com/gpu`` and pins the worker to it (``--gpus 0``).
- ``postgres-example.yaml``: a single-pod PostgreSQL (Deployment, Service, volume) to try it with, its
  password from a Secret the user creates.
- ``Dockerfile``: the worker image, built from this package's wheel.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optimizer.errors import StudyError, UsageError
from optimizer.output.deploy import memory_request_mi, resource_name, write_manifest
from optimizer.study.records import is_joint
from optimizer.study.storage import stored_study

__all__ = ["DB_SECRET", "export_workers", "postgres_example", "worker_job", "write_worker_manifests"]

DB_SECRET = "optimize-db"  # a Secret with key "url": the study's PostgreSQL URL, password included
POSTGRES_SECRET = "optimize-postgres"  # the example database's password (key "password")
MODELS_CLAIM = "optimize-models"
MODELS_DIR = "/models"
FETCH_IMAGE = "curlimages/curl:8.11.1"
BUILTIN_SPACES = ("cpu", "gpu")
JOB_KEYS = ("apiVersion", "kind", "metadata.name", "spec.parallelism", "spec.template.spec.containers")


def _study_args(attrs: Mapping[str, Any], study_name: str, model_file: str) -> list[str]:
    """``optimize study`` as the study was run: its model, shapes, space, levels, budgets."""
    space = (attrs.get("space") or {}).get("name", "cpu")
    args = [
        "optimize",
        "study",
        "--model",
        f"{MODELS_DIR}/{model_file}",
        "--study-name",
        study_name,
        "--storage",
        "$(OPTIMIZE_STORAGE)",  # Kubernetes expands it from the Secret-backed variable
        "--budget",
        str(attrs.get("budget", 40)),
        "--space",
        space if space in BUILTIN_SPACES else f"{MODELS_DIR}/space.yaml",
    ]
    if attrs.get("latency_budget_ms") is not None:
        args += ["--latency-budget-ms", f"{attrs['latency_budget_ms']:g}"]
    for name, dims in (attrs.get("shapes") or {}).items():
        args += ["--shape", f"{name}:{','.join(str(d) for d in dims)}"]
    if attrs.get("concurrency_levels"):
        args += ["--concurrency", ",".join(str(c) for c in attrs["concurrency_levels"])]
    return args


def _memory_request_mi(study) -> int | None:
    """The most memory any trial's server held (a worker may measure any config), plus the margin."""
    figures = [
        t.user_attrs["memory_mb"] for t in study.get_trials(deepcopy=False) if t.user_attrs.get("memory_mb")
    ]
    return memory_request_mi(max(figures, default=None))


def worker_job(
    study,
    *,
    workers: int,
    image: str,
    model_url: str | None = None,
    model_claim: str = MODELS_CLAIM,
    db_secret: str = DB_SECRET,
) -> tuple[dict[str, Any], list[str]]:
    """The Indexed Job of ``workers`` pods, and the comment lines saying where each number came from."""
    attrs = study.user_attrs
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if is_joint(attrs):
        raise UsageError("k8s-workers runs one model's study; a study of several models runs on one server")
    model_file = Path(str(attrs.get("model_path", "model.onnx"))).name
    gpu = (attrs.get("space") or {}).get("device") == "gpu"
    name = resource_name(f"optimize-{study.study_name}", 52)
    command = _study_args(attrs, study.study_name, model_file) + (["--gpus", "0"] if gpu else [])
    cores = attrs.get("cpu_cores") or (attrs.get("hardware") or {}).get("cores")
    memory = _memory_request_mi(study)
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if cores:
        requests["cpu"] = limits["cpu"] = str(cores)
    if memory:
        requests["memory"] = f"{memory}Mi"
        limits["memory"] = f"{memory * 2}Mi"
    if gpu:
        limits["nvidia.com/gpu"] = 1
    container: dict[str, Any] = {
        "name": "optimize",
        "image": image,
        "command": command,
        "env": [
            {"name": "OPTIMIZE_STORAGE", "valueFrom": {"secretKeyRef": {"name": db_secret, "key": "url"}}},
            {"name": "OPTIMIZE_CACHE_DIR", "value": "/cache"},
        ],
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_DIR},
            {"name": "cache", "mountPath": "/cache"},
        ],
    }
    labels = {
        "app.kubernetes.io/name": "optimize-worker",
        "optimize.study": resource_name(study.study_name, 63),
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "affinity": {
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}
                ]
            }
        },
        "containers": [container],
        "volumes": [{"name": "cache", "emptyDir": {}}],
    }
    if model_url:
        spec["volumes"].append({"name": "models", "emptyDir": {}})
        spec["initContainers"] = [
            {
                "name": "fetch-model",
                "image": FETCH_IMAGE,
                "command": ["curl", "-fsSL", "--retry", "5", "-o", f"{MODELS_DIR}/{model_file}", model_url],
                "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR}],
            }
        ]
    else:
        spec["volumes"].append(
            {"name": "models", "persistentVolumeClaim": {"claimName": model_claim, "readOnly": True}}
        )
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": workers,
            "backoffLimit": workers,  # a worker that dies is retried; its trial fails and is re-run
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }
    notes = _notes(study, workers, cores, memory, gpu, model_url, model_claim, db_secret, command)
    return job, notes


def _notes(study, workers, cores, memory, gpu, model_url, model_claim, db_secret, command) -> list[str]:
    budget = study.user_attrs.get("budget", 40)
    notes = [
        f"{workers} workers of study {study.study_name!r}, one pod per node, sharing its budget of {budget} trials",
        "through the study's PostgreSQL: each claims the next trial until the study holds the budget,",
        "so together they run exactly that many (the first enqueues the baseline once).",
        f"Database: the Secret {db_secret!r} (key 'url'), e.g. kubectl create secret generic {db_secret} "
        "--from-literal=url=postgresql://USER:PASSWORD@HOST/DB",
        "Model: "
        + (f"fetched from {model_url} by an init container" if model_url else f"the PVC {model_claim!r}")
        + f" at {MODELS_DIR}/.",
    ]
    if cores:
        notes.append(
            f"cpu {cores}: the cores the study measured on; its configs' instances and threads assume them."
        )
    if memory:
        notes.append(
            f"memory {memory}Mi: the most any of its servers held (resident), plus 25%; twice that as the limit."
        )
    if gpu:
        notes.append("nvidia.com/gpu 1 and --gpus 0: a GPU space measures on the pod's one GPU.")
    notes.append("Each pod runs its own Triton inside it, on 127.0.0.1 only (the embedded target).")
    notes.append("Command: " + shlex.join(command))
    return notes


def postgres_example(secret: str = POSTGRES_SECRET) -> list[dict[str, Any]]:
    """A single-pod PostgreSQL to try the workers with: its password from the Secret ``secret``."""
    labels = {"app.kubernetes.io/name": "optimize-postgres"}
    password = {"secretKeyRef": {"name": secret, "key": "password"}}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "optimize-postgres", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {
                                "name": "postgres",
                                "image": "postgres:16",
                                "env": [
                                    {"name": "POSTGRES_USER", "value": "optimize"},
                                    {"name": "POSTGRES_DB", "value": "studies"},
                                    {"name": "POSTGRES_PASSWORD", "valueFrom": password},
                                ],
                                "ports": [{"containerPort": 5432}],
                                "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}],
                            }
                        ],
                        "volumes": [{"name": "data", "emptyDir": {}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "optimize-postgres", "labels": labels},
            "spec": {"selector": labels, "ports": [{"port": 5432, "targetPort": 5432}]},
        },
    ]


DOCKERFILE = """\
# The optimize worker image: build the wheel beside this file, then the image.
#   pip wheel --no-deps -w {out} /path/to/optimize && docker build -t REGISTRY/optimize:{version} {out}
FROM python:3.11-slim
COPY optimize-*.whl /tmp/
RUN pip install --no-cache-dir /tmp/optimize-*.whl && rm /tmp/optimize-*.whl
ENTRYPOINT []
"""


def write_worker_manifests(
    study,
    out_dir: Path,
    *,
    workers: int,
    image: str,
    model_url: str | None = None,
    model_claim: str = MODELS_CLAIM,
    db_secret: str = DB_SECRET,
) -> tuple[Path, ...]:
    """Write ``job.yaml``, ``postgres-example.yaml`` and ``Dockerfile`` into ``out_dir``.

    Raises:
        StudyError: when the study has no latency budget yet (run it once first, anywhere).
    """
    from importlib.metadata import version

    import yaml

    if study.user_attrs.get("latency_budget_ms") is None:
        raise StudyError(
            f"study {study.study_name!r} has no latency budget yet: run it once (optimize study) so the "
            "workers share its budget and settings"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    job, notes = worker_job(
        study, workers=workers, image=image, model_url=model_url, model_claim=model_claim, db_secret=db_secret
    )
    written = [write_manifest(out_dir / "job.yaml", job, JOB_KEYS, "\n".join(notes))]
    example = out_dir / "postgres-example.yaml"
    header = (
        "A PostgreSQL to try the workers with (data in an emptyDir: gone with the pod). First:\n"
        f"  kubectl create secret generic {POSTGRES_SECRET} --from-literal=password=$(openssl rand -hex 16)\n"
        f"then the workers' Secret with its URL: postgresql://optimize:PASSWORD@optimize-postgres/studies"
    )
    text = "".join(f"# {line}\n" for line in header.splitlines())
    text += "---\n".join(yaml.safe_dump(doc, sort_keys=False) for doc in postgres_example())
    example.write_text(text)
    dockerfile = out_dir / "Dockerfile"
    dockerfile.write_text(DOCKERFILE.format(out=out_dir, version=version("optimize")))
    return (*written, example, dockerfile)


def export_workers(
    study_name: str,
    out_dir: Path,
    *,
    storage: str | None,
    workers: int,
    image: str | None = None,
    model_url: str | None = None,
) -> tuple[Path, ...]:
    """Write the Kubernetes manifests that run ``workers`` workers of a PostgreSQL study.

    Raises:
        UsageError: for a study outside PostgreSQL (workers on several machines share it there).
    """
    from importlib.metadata import version

    if storage is None or not storage.startswith(("postgresql", "postgres")):
        raise UsageError(
            "workers on a cluster share the study through PostgreSQL: move it there (optimize migrate --from "
            "sqlite:///studies/NAME.db --to postgresql://...) and pass --storage postgresql://..."
        )
    with stored_study(study_name, storage) as study:
        return write_worker_manifests(
            study,
            out_dir,
            workers=workers,
            image=image or f"optimize:{version('optimize')}",
            model_url=model_url,
        )
