"""The formats ``optimize export`` writes: a leaf, so the command line lists them without loading the writers."""

from __future__ import annotations

from enum import Enum

__all__ = ["FORMATS", "ExportFormat"]


class ExportFormat(str, Enum):
    """What ``optimize export`` writes besides the Triton model repository."""

    triton = "triton"  # the model repository alone
    azureml = "azureml"  # + an Azure ML managed online endpoint and deployment
    kserve = "kserve"  # + a KServe InferenceService
    k8s_workers = "k8s-workers"  # a Kubernetes Job of workers that run the study itself (no repository)


FORMATS = tuple(f.value for f in ExportFormat)
