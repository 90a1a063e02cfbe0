"""Build a serving target by name, from the command line's options: ``make_target("remote", url=...)``.

Each option belongs to the targets it applies to; giving one to another target is a usage error
naming the flag, so a forgotten ``--target`` never silently tunes the wrong server.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimizer.errors import UsageError
from optimizer.measurement.joint_replay import JointReplayTarget, is_joint_recording
from optimizer.measurement.replay import ReplayTarget
from optimizer.serving import TARGET_KINDS
from optimizer.serving.base import ServingTarget
from optimizer.serving.docker import DEFAULT_TAG, DockerTriton
from optimizer.serving.embedded import EmbeddedTriton
from optimizer.serving.local import LocalTriton
from optimizer.serving.remote import RemoteTriton, TlsOptions

__all__ = ["TARGET_KINDS", "TARGET_OPTIONS", "check_target_options", "make_target", "parse_headers"]


# option -> (its command-line flag, the targets it applies to)
_OPTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "triton_binary": ("--triton-binary", ("local",)),
    "backend_directory": ("--backend-directory", ("local",)),
    "docker_image_tag": ("--docker-image-tag", ("docker",)),
    "url": ("--url", ("remote",)),
    "metrics_url": ("--metrics-url", ("remote",)),
    "ssl_root_cert": ("--ssl-root-cert", ("remote",)),
    "ssl_client_cert": ("--ssl-client-cert", ("remote",)),
    "ssl_client_key": ("--ssl-client-key", ("remote",)),
    "headers": ("--header", ("remote",)),
    "memory_limit_mb": ("--memory-limit-mb", ("embedded", "local")),
}
TARGET_OPTIONS = tuple(_OPTIONS)


def parse_headers(values: Sequence[str]) -> dict[str, str]:
    """``["Authorization:Bearer x"]`` -> ``{"authorization": "Bearer x"}`` (gRPC metadata keys are lowercase)."""
    headers: dict[str, str] = {}
    for value in values:
        key, sep, content = value.partition(":")
        key = key.strip().lower()
        if not sep or not key or any(c.isspace() for c in key):
            raise UsageError(f"--header takes KEY:VALUE (e.g. Authorization:Bearer TOKEN), got {value!r}")
        headers[key] = content.strip()
    return headers


def check_target_options(kind: str, **options: Any) -> dict[str, Any]:
    """The options given (None or empty means not given), checked to apply to ``kind``.

    Raises:
        UsageError: an unknown kind, or an option given to a target it does not apply to.
    """
    kind, _, argument = kind.partition(":")
    if kind not in TARGET_KINDS:
        raise UsageError(f"--target must be one of {', '.join(TARGET_KINDS)}, got {kind!r}")
    if (kind == "replay") != bool(argument):
        raise UsageError(
            "--target replay takes the recording's directory, e.g. --target replay:bench/data/encoder"
            if kind == "replay"
            else f"--target {kind} takes no ':' argument"
        )
    given = {key: value for key, value in options.items() if value is not None and value not in ((), [], {})}
    for key in given:
        if key not in _OPTIONS:
            raise TypeError(f"unknown serving target option {key!r}")
        flag, kinds = _OPTIONS[key]
        if kind not in kinds:
            raise UsageError(f"{flag} applies to --target {' or '.join(kinds)}, not --target {kind}")
    return given


def make_target(
    kind: str,
    *,
    gpu_space: bool = False,
    gpu_devices: str | None = None,
    seed: int | None = None,
    **options: Any,
) -> ServingTarget:
    """The serving target ``kind`` built from command-line options (None or empty means not given).

    Args:
        kind: embedded, local, docker, remote, or replay:DIR (a recorded surface: one model's, or a
            joint recording of several models tuned together).
        gpu_space: whether the space is a GPU space (the docker target then requests GPUs).
        gpu_devices: which GPUs the docker target requests (``"0,1"``; default all of them).
        seed: seeds the replay target's draws of recorded repeats.
        **options: triton_binary, backend_directory (local); docker_image_tag (docker); url,
            metrics_url, ssl_root_cert, ssl_client_cert, ssl_client_key, headers (remote);
            memory_limit_mb (embedded, local: the server runs in a memory cgroup of that size).

    Raises:
        UsageError: an unknown kind, an option given to a target it does not apply to, a missing --url.
    """
    given = check_target_options(kind, **options)
    kind, _, argument = kind.partition(":")
    if kind == "replay":
        if is_joint_recording(argument):
            return JointReplayTarget(argument, seed=seed)
        return ReplayTarget(argument, seed=seed)
    limit = {"memory_limit_mb": given["memory_limit_mb"]} if "memory_limit_mb" in given else {}
    if kind == "embedded":
        return EmbeddedTriton(**limit)
    if kind == "local":
        return LocalTriton(given.get("triton_binary"), given.get("backend_directory"), **limit)
    if kind == "docker":
        return DockerTriton(
            tag=given.get("docker_image_tag", DEFAULT_TAG), gpus=gpu_space, gpu_devices=gpu_devices
        )
    return _remote(given)


def _remote(given: dict[str, Any]) -> ServingTarget:

    if "url" not in given:
        raise UsageError("--target remote needs --url HOST:PORT of the server's gRPC endpoint")
    tls = TlsOptions(
        root_cert=_path(given.get("ssl_root_cert")),
        client_cert=_path(given.get("ssl_client_cert")),
        client_key=_path(given.get("ssl_client_key")),
    )
    headers = given.get("headers", {})
    if not isinstance(headers, dict):
        headers = parse_headers(headers)
    return RemoteTriton(given["url"], metrics_url=given.get("metrics_url"), tls=tls, headers=headers)


def _path(value: Any) -> Path | None:
    return Path(value) if value is not None else None
