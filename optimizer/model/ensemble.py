"""A Triton ensemble whose steps are ONNX models: its config, its steps' files, and its requests.

An ensemble (``platform: "ensemble"``) has no model file of its own: Triton passes each request through
its steps (``ensemble_scheduling.step``), each step's inputs fed from the ensemble's inputs or from
earlier steps' outputs. optimize tunes an ensemble as its steps (each step's config is a model of the
joint study, :mod:`optimizer.study.joint`) and measures it through the ensemble. The user's repository
is laid out as Triton's documentation shows::

    repo/pipeline/config.pbtxt      platform: "ensemble", its inputs, outputs and steps
    repo/pipeline/1/                empty
    repo/preprocess/1/model.onnx    a step; its own config.pbtxt, if any, may name another file
    repo/classifier/1/model.onnx

The step requests a study sends to each step (for its accuracy guard and in-process checks) are what the
ensemble's own requests become on their way through the earlier steps, run here by ONNX Runtime.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from optimizer.errors import ModelError
from optimizer.model.intake import (
    SYNTHETIC_SAMPLES,
    ModelInfo,
    TensorSpec,
    load_input_data,
    resolve_shapes,
    synthetic_inputs,
)

__all__ = [
    "ENSEMBLE_PLACEHOLDER",
    "Ensemble",
    "EnsembleStep",
    "ensemble_files",
    "ensemble_info",
    "ensemble_requests",
    "is_ensemble_path",
    "load_ensemble",
    "run_ensemble",
]

# Triton loads an ensemble only from a directory with a version subdirectory, which holds nothing. A load
# request can only carry files, so the version directory travels as this empty file (as in git checkouts).
ENSEMBLE_PLACEHOLDER = "1/.gitkeep"

_ONNX_BACKENDS = {"", "onnxruntime", "onnxruntime_onnx"}


@dataclass(frozen=True)
class EnsembleStep:
    """One step: the ONNX model it runs and how its tensors connect to the ensemble's."""

    model_name: str
    path: Path  # the step's ONNX file in the user's repository
    input_map: Mapping[str, str]  # the step's input name -> the ensemble tensor it reads
    output_map: Mapping[str, str]  # the step's output name -> the ensemble tensor it writes


@dataclass(frozen=True)
class Ensemble:
    """An ensemble as its ``config.pbtxt`` declares it, with its steps in the order they can run."""

    name: str
    config_path: Path
    config_text: str  # the user's config.pbtxt; the study renders it again with its steps' max batch size
    max_batch_size: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    steps: tuple[EnsembleStep, ...]

    @property
    def sha256(self) -> str:
        """The identity of the ensemble's wiring (its steps' files have their own)."""
        return hashlib.sha256(self.config_text.encode()).hexdigest()


def ensemble_files(cache: Path) -> dict[str, Path]:
    """The files an ensemble is loaded with: its empty version directory's placeholder."""
    placeholder = cache / "ensemble" / Path(ENSEMBLE_PLACEHOLDER).name
    if not placeholder.is_file():
        placeholder.parent.mkdir(parents=True, exist_ok=True)
        placeholder.write_bytes(b"")
    return {ENSEMBLE_PLACEHOLDER: placeholder}


def is_ensemble_path(path: Path) -> bool:
    """A model given as a directory or its ``config.pbtxt`` is an ensemble; an ``.onnx`` file is a model."""
    return path.is_dir() or path.name == "config.pbtxt"


def load_ensemble(path: Path) -> Ensemble:
    """Read an ensemble's ``config.pbtxt`` (``path``: its directory or the file) and find its steps' files.

    Raises:
        ModelError: the config is missing, unreadable, not an ensemble, or a step is not an ONNX model
            of the same repository.
    """
    config_path = path / "config.pbtxt" if path.is_dir() else path
    if not config_path.is_file():
        raise ModelError(
            f"{str(path)!r} is a directory with no config.pbtxt: give a model's .onnx file, or an ensemble's "
            "directory (holding its config.pbtxt)"
        )
    text = config_path.read_text()
    try:
        config = text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ModelError(f"{str(config_path)!r} is not a valid Triton config.pbtxt: {exc}") from exc
    if config.platform != "ensemble":
        raise ModelError(
            f"{str(config_path)!r} is not an ensemble (platform {config.platform or 'unset'!r}): "
            "give an .onnx file for a single model, or an ensemble's directory"
        )
    name = config_path.parent.name
    steps = [_step(item, config_path.parent.parent, name) for item in config.ensemble_scheduling.step]
    if not steps:
        raise ModelError(f"ensemble {name!r} has no steps: add ensemble_scheduling {{ step [...] }}")
    used = [step.model_name for step in steps]
    twice = next((model for model in used if used.count(model) > 1), None)
    if twice:
        raise ModelError(
            f"ensemble {name!r} runs model {twice!r} in two steps: optimize tunes each step as its own model"
        )
    inputs = tuple(tensor.name for tensor in config.input)
    return Ensemble(
        name=name,
        config_path=config_path,
        config_text=text,
        max_batch_size=config.max_batch_size,
        inputs=inputs,
        outputs=tuple(tensor.name for tensor in config.output),
        steps=_in_running_order(steps, inputs, name),
    )


def _step(item, repository: Path, ensemble: str) -> EnsembleStep:
    directory = repository / item.model_name
    if not directory.is_dir():
        raise ModelError(
            f"ensemble {ensemble!r} runs {item.model_name!r}, which is not in its repository "
            f"({str(directory)!r} is missing)"
        )
    filename = "model.onnx"
    own = directory / "config.pbtxt"
    if own.is_file():
        try:
            step_config = text_format.Parse(own.read_text(), mc.ModelConfig())
        except text_format.ParseError as exc:
            raise ModelError(f"{str(own)!r} is not a valid Triton config.pbtxt: {exc}") from exc
        kind = step_config.backend or step_config.platform
        if kind not in _ONNX_BACKENDS:
            raise ModelError(
                f"step {item.model_name!r} of ensemble {ensemble!r} is served by {kind!r}: optimize tunes "
                "ensembles whose steps are ONNX models"
            )
        filename = step_config.default_model_filename or filename
    return EnsembleStep(
        model_name=item.model_name,
        path=_version_file(directory, filename, item.model_version, ensemble),
        input_map=dict(item.input_map),
        output_map=dict(item.output_map),
    )


def _version_file(directory: Path, filename: str, version: int, ensemble: str) -> Path:
    """The step's file in the version the ensemble asks for (-1: the highest one that holds it)."""
    if version > 0:
        candidates = [directory / str(version) / filename]
    else:
        numbered = [p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
        candidates = [p / filename for p in sorted(numbered, key=lambda p: int(p.name), reverse=True)]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise ModelError(
            f"step {directory.name!r} of ensemble {ensemble!r} has no {filename} in a version directory "
            f"of {str(directory)!r}: optimize tunes ensembles whose steps are ONNX models"
        )
    return found


def _in_running_order(
    steps: list[EnsembleStep], inputs: Sequence[str], name: str
) -> tuple[EnsembleStep, ...]:
    """The steps ordered so each runs after the steps whose outputs it reads."""
    available, ordered, waiting = set(inputs), [], list(steps)
    while waiting:
        ready = next((s for s in waiting if set(s.input_map.values()) <= available), None)
        if ready is None:
            missing = sorted(set().union(*(s.input_map.values() for s in waiting)) - available)
            raise ModelError(
                f"ensemble {name!r}: no input or step produces {', '.join(map(repr, missing))}; "
                "check the steps' input_map and output_map"
            )
        ordered.append(ready)
        waiting.remove(ready)
        available |= set(ready.output_map.values())
    return tuple(ordered)


def ensemble_info(ensemble: Ensemble, steps: Mapping[str, ModelInfo]) -> ModelInfo:
    """The ensemble's inputs as a model's (dtype, dims and value range of the step input each one feeds)."""
    specs = {}
    for step in ensemble.steps:
        model = steps[step.model_name]
        known = [spec.name for spec in model.inputs]
        for step_input, tensor in step.input_map.items():
            if step_input not in known:
                raise ModelError(
                    f"ensemble {ensemble.name!r}: step {step.model_name!r} has no input {step_input!r} "
                    f"(its inputs: {', '.join(known)}): fix the step's input_map"
                )
            if tensor in ensemble.inputs and tensor not in specs:
                spec = model.input(step_input)
                specs[tensor] = TensorSpec(tensor, spec.dtype, spec.dims, spec.index_range)
        if ensemble.max_batch_size > 0 and not model.batching:
            raise ModelError(
                f"ensemble {ensemble.name!r} batches (max_batch_size {ensemble.max_batch_size}) but step "
                f"{step.model_name!r} has no dynamic batch dimension: set the ensemble's max_batch_size: 0, "
                "or export the step with a dynamic batch"
            )
    unread = [name for name in ensemble.inputs if name not in specs]
    if unread:
        raise ModelError(
            f"ensemble {ensemble.name!r}: no step reads its input {unread[0]!r}: map it in a step's input_map "
            "or remove it"
        )
    first = steps[ensemble.steps[0].model_name]
    return ModelInfo(
        source_path=ensemble.config_path,
        path=ensemble.config_path,
        sha256=ensemble.sha256,
        inputs=tuple(specs[name] for name in ensemble.inputs),
        outputs=(),
        batching=ensemble.max_batch_size > 0,
        opset=first.opset,
    )


def run_ensemble(
    ensemble: Ensemble, sessions: Mapping[str, object], request: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """Run one request through the steps in this process (ONNX Runtime ``sessions`` by step name).

    Returns:
        Every ensemble tensor (its inputs, intermediates and outputs) and each step's inputs.
    """
    tensors = dict(request)
    step_inputs = {}
    for step in ensemble.steps:
        feeds = {step_input: tensors[tensor] for step_input, tensor in step.input_map.items()}
        session = sessions[step.model_name]
        names = [output.name for output in session.get_outputs()]  # type: ignore[attr-defined]
        produced = dict(zip(names, session.run(None, feeds)))  # type: ignore[attr-defined]
        for step_output, tensor in step.output_map.items():
            tensors[tensor] = produced[step_output]
        step_inputs[step.model_name] = feeds
    return tensors, step_inputs


def ensemble_requests(
    ensemble: Ensemble,
    steps: Mapping[str, ModelInfo],
    shapes: Mapping[str, tuple[int, ...]],
    input_data: Path | None,
) -> tuple[list[dict[str, np.ndarray]], dict[str, list[dict[str, np.ndarray]]]]:
    """The ensemble's requests (the user's ``input_data`` or synthetic) and what each step receives.

    Raises:
        ModelError: a step cannot be run on what the steps before it produce.
        UsageError: the shapes or input data do not fit the ensemble's inputs.
    """
    import onnxruntime as ort

    info = ensemble_info(ensemble, steps)
    if input_data is not None:
        requests = load_input_data(info, input_data)
    else:
        resolved = resolve_shapes(info, shapes)
        requests = [synthetic_inputs(info, resolved, 1, seed=seed) for seed in range(SYNTHETIC_SAMPLES)]
    per_step: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in steps}
    try:
        sessions = {
            name: ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
            for name, model in steps.items()
        }
        for request in requests:
            _, fed = run_ensemble(ensemble, sessions, request)
            for name, feeds in fed.items():
                per_step[name].append(feeds)
    except Exception as exc:  # onnxruntime's own types: a step it cannot load, or cannot run on its feeds
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(
            f"ensemble {ensemble.name!r} does not run in ONNX Runtime ({detail}): check each step loads in "
            "onnxruntime, the steps' input_map/output_map, and that each step accepts what the one before "
            "it produces"
        ) from exc
    return requests, per_step
