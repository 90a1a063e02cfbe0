"""Several models on one server: the models file, its traffic mix and each model's latency budget.

``optimize study --models models.yaml`` tunes the models together (:mod:`optimizer.study.joint`). The
file names each model, where its ONNX file is, its request shapes and input data, its share of the
traffic and its own p99 budget::

    models:
      - name: encoder
        path: encoder.onnx           # relative to the file
        shapes: {input_ids: [128], attention_mask: [128]}
        traffic: 3                   # three encoder requests for every cnn request
        latency_budget_ms: 50
      - name: cnn
        path: cnn.onnx
        traffic: 1
        latency_budget_ms: 20
      - name: pipeline               # a Triton ensemble whose steps are ONNX models
        path: repo/pipeline          # its directory (config.pbtxt); the steps are in repo/<step>/
        shapes: {INPUT: [64]}        # its requests, by the ensemble's input names
    traffic: {encoder: 3, cnn: 1}    # instead of each model's traffic; either, not both
    latency_budget_ms: {cnn: 20}     # likewise for the budgets

A model without a budget gets the default one (10x the median of its untuned config's single-request
p99 probes, as for one model). An ensemble is tuned as its steps (each step's config) and measured
through the ensemble (:mod:`optimizer.model.ensemble`). Every rule is checked before the database is
touched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from optimizer.errors import UsageError
from optimizer.model.ensemble import is_ensemble_path
from optimizer.paths import check_name

__all__ = ["ModelEntry", "load_models_file", "models_from_dict", "models_from_flags", "parse_named_numbers"]

_MODEL_KEYS = {"name", "path", "shapes", "traffic", "latency_budget_ms", "input_data"}
_FILE_KEYS = {"models", "traffic", "latency_budget_ms"}


@dataclass(frozen=True)
class ModelEntry:
    """One model of a joint study."""

    name: str  # its name on the server and in the exported repository
    path: Path  # its .onnx file, or an ensemble's directory (or config.pbtxt)
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    traffic: float = 1.0  # its share of the requests, relative to the others'
    latency_budget_ms: float | None = None  # None: the default budget, from its probes
    input_data: Path | None = None

    @property
    def is_ensemble(self) -> bool:
        return is_ensemble_path(self.path)


def load_models_file(path: Path) -> tuple[ModelEntry, ...]:
    """Read and check a models file; every problem is one line naming the file and what to fix."""
    if not path.is_file():
        raise UsageError(f"models file {str(path)!r} does not exist: check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"models file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    return models_from_dict(data, base=path.parent, where=f"models file {str(path)!r}")


def models_from_dict(data: Any, *, base: Path, where: str = "the models file") -> tuple[ModelEntry, ...]:
    """The models of a parsed models file (paths relative to ``base``)."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise UsageError(f"{where} must hold 'models:', a list of at least two models (name, path, ...)")
    _unknown(data, _FILE_KEYS, where)
    entries = [_entry(item, index, base, where) for index, item in enumerate(data["models"])]
    names = [entry.name for entry in entries]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise UsageError(f"{where} names two models {duplicate!r}: each model needs its own name")
    if len(entries) < 2 and not entries[0].is_ensemble:  # one ensemble is tuned as its steps
        raise UsageError(
            f"{where} names one model: for one model run optimize study --model {entries[0].path}"
        )
    entries = _apply_mapping(entries, data.get("traffic"), "traffic", where)
    entries = _apply_mapping(entries, data.get("latency_budget_ms"), "latency_budget_ms", where)
    return tuple(entries)


def models_from_flags(
    paths: list[Path],
    shapes: Mapping[str, tuple[int, ...]],
    traffic: str | None,
    budgets: str | None,
) -> tuple[ModelEntry, ...]:
    """The models of ``optimize study --model a.onnx --model b.onnx [--traffic a=3,b=1] ...``.

    Each model is named after its file (an ensemble after its directory); ``--shape MODEL.INPUT:DIMS``
    names the model of each shape; ``--latency-budget-ms`` is one number for every model or
    ``NAME=MS,...``. The same rules as a models file apply.
    """
    names = [path.parent.name if path.name == "config.pbtxt" else path.stem for path in paths]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice:
        raise UsageError(
            f"two --model files are named {twice!r}: rename one, or name each model in a models file (--models)"
        )
    per_model: dict[str, dict[str, list[int]]] = {name: {} for name in names}
    for key, dims in shapes.items():
        # The longest model name the key starts with: model names may hold dots too (bert.v2).
        model = max((n for n in names if key.startswith(n + ".")), key=len, default="")
        tensor = key[len(model) + 1 :]
        if not model or not tensor:
            raise UsageError(
                f"--shape {key}: with several --model, name the model of each shape: "
                f"--shape {names[0]}.INPUT:D1,D2 (models: {', '.join(names)})"
            )
        per_model[model][tensor] = list(dims)
    data: dict[str, Any] = {
        "models": [
            {"name": name, "path": str(path), "shapes": per_model[name]} for name, path in zip(names, paths)
        ]
    }
    if traffic is not None:
        data["traffic"] = parse_named_numbers(traffic, "--traffic", "encoder=3,cnn=1")
    if budgets is not None:
        number = _number_or_none(budgets)
        given = {n: number for n in names} if number is not None else None
        data["latency_budget_ms"] = given or parse_named_numbers(
            budgets, "--latency-budget-ms", "encoder=50,cnn=20 (or one number for every model)"
        )
    return models_from_dict(data, base=Path.cwd(), where="the command line")


def parse_named_numbers(text: str, flag: str, example: str) -> dict[str, float]:
    """``a=3,b=1`` as a mapping; a malformed pair is one line naming the flag and an example."""
    mapping: dict[str, float] = {}
    for pair in text.split(","):
        name, sep, value = pair.partition("=")
        number = _number_or_none(value)
        if not sep or not name.strip() or number is None:
            raise UsageError(f"{flag} {text!r} is malformed: write NAME=NUMBER,... e.g. {example}")
        mapping[name.strip()] = number
    return mapping


def _number_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _entry(item: Any, index: int, base: Path, where: str) -> ModelEntry:
    if not isinstance(item, dict):
        raise UsageError(f"{where}: model {index + 1} must be a mapping with name and path")
    _unknown(item, _MODEL_KEYS, f"{where}, model {index + 1}")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise UsageError(f"{where}: model {index + 1} has no name: add name: <its name on the server>")
    check_name(name, "model name")
    if not isinstance(item.get("path"), str):
        raise UsageError(
            f"{where}: model {name!r} has no path: add path: <its .onnx file, or an ensemble's directory>"
        )
    path = (base / item["path"]).resolve()
    data = item.get("input_data")
    return ModelEntry(
        name=name,
        path=path,
        shapes=_shapes(item.get("shapes") or {}, name, where),
        traffic=_positive(item.get("traffic", 1.0), f"{where}: model {name!r} traffic"),
        latency_budget_ms=_budget(item.get("latency_budget_ms"), name, where),
        input_data=(base / data).resolve() if isinstance(data, str) else None,
    )


def _apply_mapping(entries: list[ModelEntry], mapping: Any, key: str, where: str) -> list[ModelEntry]:
    """A file-level ``traffic:`` or ``latency_budget_ms:`` mapping, by model name."""
    if mapping is None:
        return entries
    if not isinstance(mapping, dict):
        raise UsageError(f"{where}: {key} must map model names to numbers, e.g. {{encoder: 3, cnn: 1}}")
    names = {entry.name for entry in entries}
    unknown = sorted(str(name) for name in mapping if name not in names)
    if unknown:
        raise UsageError(
            f"{where}: {key} names {unknown[0]!r}, which is not one of the models ({', '.join(sorted(names))})"
        )
    out = []
    for entry in entries:
        if entry.name not in mapping:
            out.append(entry)
        elif key == "traffic":
            out.append(
                replace(entry, traffic=_positive(mapping[entry.name], f"{where}: traffic of {entry.name!r}"))
            )
        else:
            out.append(replace(entry, latency_budget_ms=_budget(mapping[entry.name], entry.name, where)))
    return out


def _shapes(value: Any, name: str, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict):
        raise UsageError(
            f"{where}: shapes of {name!r} must map input names to dims, e.g. {{input_ids: [128]}}"
        )
    shapes = {}
    for input_name, dims in value.items():
        if not isinstance(dims, list) or not all(isinstance(d, int) and d >= 1 for d in dims):
            raise UsageError(f"{where}: shape of {name}.{input_name} must be a list of whole numbers >= 1")
        shapes[str(input_name)] = tuple(dims)
    return shapes


def _positive(value: Any, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UsageError(f"{what} must be a positive number, not {value!r}")
    return float(value)


def _budget(value: Any, name: str, where: str) -> float | None:
    if value is None:
        return None
    return _positive(value, f"{where}: latency_budget_ms of {name!r}")


def _unknown(data: dict, known: set[str], where: str) -> None:
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
