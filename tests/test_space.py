"""Tests for optimizer.config.space: validated search spaces and the Optuna trial -> Candidate mapping."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from optimizer.config.render import render_config
from optimizer.config.space import (
    PREFERRED_DIVISORS,
    SPACES_DIR,
    Candidate,
    IntRange,
    SearchSpace,
    baseline_params,
    derived_threads,
    fit_params,
    grid_of,
    instance_span,
    load_space,
    space_from_dict,
    suggest_candidate,
)
from optimizer.errors import SpaceError
from optimizer.model.intake import ModelInfo, TensorSpec

REPO_SPACES = Path(__file__).resolve().parent.parent / "spaces"
# The cores the server may use in these tests (this machine has two).
CORES = 2

# Every parameter has more than one value, so every branch of suggest_candidate asks the trial.
WIDE = space_from_dict(
    {
        "name": "wide",
        "device": "gpu",
        "execution_providers": ["cpu", "openvino", "cuda", "tensorrt"],
        "precisions": ["fp32", "fp16", "int8"],
        "max_batch_size": [1, 64],
        "preferred_batch_sizes": True,
        "max_queue_delay_us": [0, 5000],
        "instance_count": [1, 3],
        "intra_op_threads": [0, 4],
        "graph_levels": ["default", "basic", "extended", "disabled"],
    }
)
# The narrowest space: nothing to batch, no delay, no preferred sizes to choose.
NARROW = space_from_dict(
    {
        "max_batch_size": 1,
        "preferred_batch_sizes": False,
        "max_queue_delay_us": 0,
        "instance_count": 1,
        "intra_op_threads": 0,
    }
)
# Listed values (a finite grid, like the recorded surfaces' space).
LISTED = space_from_dict(
    {
        "precisions": ["fp32", "int8"],
        "max_batch_size": {"choices": [1, 8, 32]},
        "preferred_batch_sizes": [[], [1], [1, 2]],
        "max_queue_delay_us": {"choices": [0, 5000]},
        "instance_count": {"choices": [1, 3]},
        "intra_op_threads": {"choices": [0, 2]},
        "oversubscribe": True,
    }
)
SPACES = {
    "cpu": load_space("cpu"),
    "gpu": load_space("gpu"),
    "wide": WIDE,
    "narrow": NARROW,
    "listed": LISTED,
    "grid-small": load_space("grid-small"),
}


def _assert_candidate_invariants(candidate: Candidate, space: SearchSpace, *, batching: bool) -> None:
    assert candidate.provider in space.execution_providers
    assert candidate.precision in space.precisions
    assert candidate.graph_level in space.graph_levels
    assert space.instance_count.low <= candidate.instance_count <= space.instance_count.high
    if space.oversubscribe:
        assert space.intra_op_threads.low <= candidate.intra_op_threads <= space.intra_op_threads.high
    else:  # the instances share the cores: never more threads in all than cores
        assert candidate.instance_count * (candidate.intra_op_threads or CORES) <= CORES
    if not batching:
        assert candidate.max_batch_size == 0
    else:
        assert space.max_batch_size.low <= candidate.max_batch_size <= space.max_batch_size.high
        assert math.log2(candidate.max_batch_size).is_integer()
    sizes = candidate.preferred_batch_sizes
    assert all(1 < size <= candidate.max_batch_size for size in sizes)
    assert list(sizes) == sorted(set(sizes), reverse=True)
    if candidate.max_batch_size <= 1:
        assert sizes == ()
        assert candidate.max_queue_delay_us == 0


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "device"), [("cpu", "cpu"), ("gpu", "gpu")])
def test_load_space_by_name_resolves_the_bundled_yaml(name: str, device: str) -> None:
    space = load_space(name)

    # The package reads the checkout's spaces/ (linked into the package, so a wheel carries them).
    assert Path(str(SPACES_DIR)).resolve() == REPO_SPACES.resolve()
    assert Path(space.source).resolve() == (REPO_SPACES / f"{name}.yaml").resolve()
    assert space.name == name
    assert space.device == device
    assert load_space(str(REPO_SPACES / f"{name}.yaml")) == space


def test_load_space_by_path_reads_and_validates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "device: cpu\n"
        "execution_providers: [cpu, openvino]\n"
        "precisions: [fp32, int8]\n"
        "max_batch_size: [1, 8]\n"
        "preferred_batch_sizes: false\n"
        "max_queue_delay_us: [0, 1000]\n"
        "instance_count: [1, 3]\n"
        "intra_op_threads: [0, 2]\n"
        "oversubscribe: true\n"
    )

    space = load_space(str(path))

    assert space.source == str(path)
    assert space.to_dict() == {
        "name": "mine",  # the file's stem when the file names none
        "device": "cpu",
        "execution_providers": ["cpu", "openvino"],
        "precisions": ["fp32", "int8"],
        "max_batch_size": [1, 8],
        "preferred_batch_sizes": False,
        "max_queue_delay_us": [0, 1000],
        "instance_count": [1, 3],
        "intra_op_threads": [0, 2],
        "graph_levels": ["default"],
        "oversubscribe": True,
    }


def test_load_space_rejects_an_unknown_name_and_lists_the_bundled_spaces() -> None:
    with pytest.raises(SpaceError) as caught:
        load_space("turbo")

    message = caught.value.message
    assert "'turbo'" in message
    assert "cpu" in message and "gpu" in message


def test_load_space_rejects_a_missing_file_naming_its_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(SpaceError, match="does not exist") as caught:
        load_space(str(path))

    assert str(path) in caught.value.message


def test_load_space_by_name_ignores_a_same_named_directory_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cpu").mkdir()
    monkeypatch.chdir(tmp_path)

    assert Path(load_space("cpu").source).resolve() == (REPO_SPACES / "cpu.yaml").resolve()


def test_load_space_rejects_invalid_yaml_in_one_line_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("max_batch_size: [1, 8\ninstance_count: [1, 2]\n")

    with pytest.raises(SpaceError, match="not valid YAML") as caught:
        load_space(str(path))

    assert str(path) in caught.value.message
    assert "\n" not in caught.value.message


def test_load_space_rejects_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- cpu\n- gpu\n")

    with pytest.raises(SpaceError, match="must hold a mapping of fields, got list"):
        load_space(str(path))


def test_load_space_reports_unknown_fields_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("max_batch_sizes: [1, 8]\n")

    with pytest.raises(SpaceError, match="max_batch_sizes"):
        load_space(str(path))


# --- validation ---------------------------------------------------------------------------------


def test_space_from_dict_fills_every_omitted_field_with_its_default() -> None:
    assert space_from_dict({}) == SearchSpace(
        name="custom",
        device="cpu",
        execution_providers=("cpu",),
        precisions=("fp32",),
        max_batch_size=IntRange(1, 16),
        preferred_batch_sizes=True,
        max_queue_delay_us=IntRange(0, 10000),
        instance_count=IntRange(1, 2),
        intra_op_threads=IntRange(0, 0),
        graph_levels=("default",),
        oversubscribe=False,  # on CPU the instances share the cores unless the space says otherwise
    )


def test_space_from_dict_accepts_a_single_number_as_a_one_point_range() -> None:
    space = space_from_dict({"instance_count": 1, "max_batch_size": 1})

    assert space.instance_count == IntRange(1, 1)
    assert space.max_batch_size == IntRange(1, 1)


def test_gpu_space_defaults_to_cuda_and_also_allows_cpu_providers() -> None:
    assert space_from_dict({"device": "gpu"}).execution_providers == ("cuda",)
    assert space_from_dict(
        {"device": "gpu", "execution_providers": ["tensorrt", "cpu"]}
    ).execution_providers == (
        "tensorrt",
        "cpu",
    )


@pytest.mark.parametrize(
    ("data", "field", "bad_value"),
    [
        pytest.param({"batch_size": [1, 8]}, "batch_size", None, id="unknown-key"),
        pytest.param({"device": "tpu"}, "device", "'tpu'", id="device-not-a-choice"),
        pytest.param({"execution_providers": []}, "execution_providers", "[]", id="empty-list"),
        pytest.param({"execution_providers": 3}, "execution_providers", "3", id="providers-not-a-list"),
        pytest.param(
            {"execution_providers": ["cpu", "cpu"]},
            "execution_providers",
            "'cpu'",
            id="duplicate-provider",
        ),
        pytest.param({"precisions": ["fp32", "fp8"]}, "precisions", "'fp8'", id="unknown-precision"),
        pytest.param({"graph_levels": ["default", "max"]}, "graph_levels", "'max'", id="unknown-graph-level"),
        pytest.param({"max_batch_size": "big"}, "max_batch_size", "'big'", id="range-is-a-string"),
        pytest.param({"max_batch_size": [1, 2, 4]}, "max_batch_size", "[1, 2, 4]", id="range-of-three"),
        pytest.param({"instance_count": [1, 2.5]}, "instance_count", "2.5", id="range-has-a-float"),
        pytest.param({"instance_count": [1, True]}, "instance_count", "True", id="range-has-a-bool"),
        pytest.param({"preferred_batch_sizes": "yes"}, "preferred_batch_sizes", "'yes'", id="not-a-bool"),
        pytest.param({"max_queue_delay_us": [100, 10]}, "max_queue_delay_us", "10", id="empty-range"),
        pytest.param({"instance_count": [3, 2]}, "instance_count", "2", id="empty-instance-range"),
        pytest.param({"max_queue_delay_us": [-5, 10]}, "max_queue_delay_us", "-5", id="below-minimum"),
        pytest.param({"max_batch_size": [0, 8]}, "max_batch_size", "0", id="batch-size-zero"),
        pytest.param({"max_batch_size": [1, 12]}, "max_batch_size", "12", id="not-a-power-of-two"),
        pytest.param(
            {"execution_providers": ["cuda"]},
            "execution_providers",
            "'cuda'",
            id="gpu-in-cpu-space",
        ),
    ],
)
def test_space_from_dict_rejects_bad_values_naming_the_field_and_value(
    data: dict[str, Any], field: str, bad_value: str | None
) -> None:
    with pytest.raises(SpaceError) as caught:
        space_from_dict(data)

    message = caught.value.message
    assert field in message
    if bad_value is not None:
        assert bad_value in message


def test_gpu_provider_in_a_cpu_space_says_to_set_device_gpu() -> None:
    with pytest.raises(SpaceError, match="set device: gpu"):
        space_from_dict({"device": "cpu", "execution_providers": ["cpu", "tensorrt"]})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param({"max_batch_size": [2, 16]}, "max_batch_size", id="batch-not-from-1"),
        pytest.param({"instance_count": [2, 4]}, "instance_count", id="instances-not-from-1"),
        pytest.param({"intra_op_threads": [1, 4]}, "intra_op_threads", id="threads-not-from-0"),
        pytest.param({"precisions": ["int8", "fp16"]}, "precisions", id="no-fp32"),
        pytest.param({"graph_levels": ["basic"]}, "graph_levels", id="no-default-graph"),
    ],
)
def test_space_from_dict_rejects_spaces_that_exclude_the_baseline(data: dict[str, Any], field: str) -> None:
    with pytest.raises(SpaceError, match="baseline") as caught:
        space_from_dict(data)

    assert field in caught.value.message


# --- suggest_candidate with real Optuna trials --------------------------------------------------


def _study() -> optuna.Study:
    return optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))


@pytest.mark.parametrize("space_name", ["cpu", "gpu", "wide", "narrow"])
def test_suggested_candidates_keep_preferred_sizes_above_one_and_within_max_batch_size(
    space_name: str,
) -> None:
    space = SPACES[space_name]
    study = _study()

    for _ in range(40):
        candidate = suggest_candidate(study.ask(), space, batching=True, cores=CORES)
        _assert_candidate_invariants(candidate, space, batching=True)


@pytest.mark.parametrize("space_name", ["cpu", "wide"])
def test_non_batching_model_always_gets_max_batch_size_zero(space_name: str) -> None:
    space = SPACES[space_name]
    study = _study()

    for _ in range(20):
        candidate = suggest_candidate(study.ask(), space, batching=False, cores=CORES)
        assert (
            candidate.max_batch_size,
            candidate.preferred_batch_sizes,
            candidate.max_queue_delay_us,
        ) == (
            0,
            (),
            0,
        )


@pytest.mark.parametrize(
    ("space_name", "expected"),
    [
        ("cpu", Candidate()),
        ("wide", Candidate()),
        ("narrow", Candidate()),
        ("gpu", Candidate(provider="cuda")),
        ("listed", Candidate()),
        ("grid-small", Candidate()),
    ],
)
def test_enqueued_baseline_params_produce_the_untuned_candidate(space_name: str, expected: Candidate) -> None:
    space = SPACES[space_name]
    study = _study()
    study.enqueue_trial(baseline_params(space))
    trial = study.ask()

    candidate = suggest_candidate(trial, space, batching=True, cores=CORES)

    assert candidate == expected
    # Every parameter the trial asked for was fixed by the baseline: none left to the sampler.
    assert trial.params == baseline_params(space)


def _cpu_params(**overrides: Any) -> dict[str, Any]:
    """FixedTrial params for the cpu space: the baseline with ``overrides``."""
    return {**baseline_params(SPACES["cpu"]), **overrides}


def test_max_batch_size_one_drops_preferred_sizes_and_queue_delay() -> None:
    params = _cpu_params(max_batch_size_log2=0, max_queue_delay_us=5000)
    params.update({f"prefer_max_div_{d}": True for d in PREFERRED_DIVISORS})

    candidate = suggest_candidate(optuna.trial.FixedTrial(params), SPACES["cpu"], batching=True, cores=CORES)

    assert candidate.max_batch_size == 1
    assert candidate.preferred_batch_sizes == ()
    assert candidate.max_queue_delay_us == 0


@pytest.mark.parametrize(
    ("log2", "prefer", "expected"),
    [
        (3, (True, True, True), (8, 4, 2)),
        (3, (False, True, False), (4,)),
        (1, (True, True, True), (2,)),  # 2/2 = 1 and 2/4 = 0 are not batch sizes worth preferring
        (2, (False, False, True), ()),  # 4/4 = 1
    ],
)
def test_preferred_sizes_are_max_halves_and_quarters_above_one(
    log2: int, prefer: tuple[bool, bool, bool], expected: tuple[int, ...]
) -> None:
    params = _cpu_params(max_batch_size_log2=log2, max_queue_delay_us=100)
    params.update({f"prefer_max_div_{d}": on for d, on in zip(PREFERRED_DIVISORS, prefer)})

    candidate = suggest_candidate(optuna.trial.FixedTrial(params), SPACES["cpu"], batching=True, cores=CORES)

    assert candidate.preferred_batch_sizes == expected


@pytest.mark.parametrize(("sampled", "delay"), [(1, 0), (9, 0), (10, 10), (2500, 2500)])
def test_sampled_queue_delay_below_10_us_means_no_delay(sampled: int, delay: int) -> None:
    params = _cpu_params(max_batch_size_log2=3, max_queue_delay_us=sampled)

    candidate = suggest_candidate(optuna.trial.FixedTrial(params), SPACES["cpu"], batching=True, cores=CORES)

    assert candidate.max_queue_delay_us == delay


# --- property: any point of the space renders a config Triton accepts ---------------------------


@st.composite
def fixed_trials(draw: st.DrawFn) -> tuple[SearchSpace, dict[str, Any]]:
    """A space, and a value from its ranges for every parameter suggest_candidate asks for."""
    space = SPACES[draw(st.sampled_from(sorted(SPACES)))]
    if space.max_batch_size.choices:  # a listed space: every value of its grid
        grid = grid_of(space, cores=CORES) if space.max_queue_delay_us.choices else {}
        return space, {name: draw(st.sampled_from(values)) for name, values in grid.items()}
    params: dict[str, Any] = {}
    for name, choices in [
        ("execution_provider", space.execution_providers),
        ("precision", space.precisions),
        ("graph_level", space.graph_levels),
    ]:
        if len(choices) > 1:
            params[name] = draw(st.sampled_from(choices))
    params["max_batch_size_log2"] = draw(
        st.integers(int(math.log2(space.max_batch_size.low)), int(math.log2(space.max_batch_size.high)))
    )
    if space.preferred_batch_sizes:
        for d in PREFERRED_DIVISORS:
            params[f"prefer_max_div_{d}"] = draw(st.booleans())
    if space.max_queue_delay_us.high > 0:
        params["max_queue_delay_us"] = draw(
            st.integers(max(space.max_queue_delay_us.low, 1), space.max_queue_delay_us.high)
        )
    instances = instance_span(space, CORES)
    params["instance_count"] = draw(st.integers(instances.low, instances.high))
    if space.oversubscribe:
        params["intra_op_threads"] = draw(
            st.integers(space.intra_op_threads.low, space.intra_op_threads.high)
        )
    return space, params


def _mlp_info(*, batching: bool) -> ModelInfo:
    batch: int | str = "batch" if batching else 1
    return ModelInfo(
        source_path=Path("/models/mlp.onnx"),
        path=Path("/models/mlp.onnx"),
        sha256="0" * 64,
        inputs=(TensorSpec("x", "float32", (batch, 64)),),
        outputs=(TensorSpec("logits", "float32", (batch, 10)),),
        batching=batching,
        opset=17,
    )


@given(drawn=fixed_trials(), batching=st.booleans())
def test_any_point_of_the_space_gives_a_candidate_whose_config_prefers_sizes_within_max_batch(
    drawn: tuple[SearchSpace, dict[str, Any]], batching: bool
) -> None:
    space, params = drawn

    candidate = suggest_candidate(optuna.trial.FixedTrial(params), space, batching=batching, cores=CORES)
    config = render_config(_mlp_info(batching=batching), candidate, model_name="mlp")

    _assert_candidate_invariants(candidate, space, batching=batching)
    assert config.max_batch_size == candidate.max_batch_size
    preferred = list(config.dynamic_batching.preferred_batch_size)
    assert all(size <= config.max_batch_size for size in preferred)
    if config.max_batch_size <= 1:
        assert not config.HasField("dynamic_batching")


# --- listed values and grids ----------------------------------------------------------------------------


def test_listed_values_are_suggested_only_from_their_list() -> None:
    study = _study()
    seen = set()
    for _ in range(60):
        candidate = suggest_candidate(study.ask(), LISTED, batching=True, cores=CORES)
        seen.add(candidate.max_batch_size)
        assert candidate.max_batch_size in (1, 8, 32)
        assert candidate.instance_count in (1, 3)
        assert candidate.intra_op_threads in (0, 2)
        assert candidate.max_queue_delay_us in (0, 5000)
        mbs = candidate.max_batch_size
        assert candidate.preferred_batch_sizes in {(), (mbs,), (mbs, mbs // 2)} or mbs == 1
    assert seen == {1, 8, 32}


def test_a_listed_space_round_trips_through_its_stored_form() -> None:
    stored = LISTED.to_dict()
    assert stored["max_batch_size"] == {"choices": [1, 8, 32]}
    assert stored["preferred_batch_sizes"] == [[], [1], [1, 2]]
    assert space_from_dict({k: v for k, v in stored.items()}) == LISTED


def test_grid_of_lists_every_value_of_every_parameter() -> None:
    assert grid_of(LISTED, cores=CORES) == {
        "precision": ["fp32", "int8"],
        "max_batch_size": [1, 8, 32],
        "preferred_batch_sizes": ["none", "max", "max,max/2"],
        "max_queue_delay_us": [0, 5000],
        "instance_count": [1, 3],
        "intra_op_threads": [0, 2],
    }


def test_grid_of_a_space_with_a_delay_range_is_refused() -> None:
    with pytest.raises(SpaceError, match="max_queue_delay_us as \\{choices"):
        grid_of(SPACES["cpu"], cores=CORES)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_batch_size", {"choices": [1, 6]}, "powers of two, got 6"),
        ("instance_count", {"choices": []}, "pair or {choices"),
        ("instance_count", {"choices": [1, 1]}, "lists a choice twice"),
        ("instance_count", {"values": [1, 2]}, "pair or {choices"),
        ("intra_op_threads", {"choices": [-1, 0]}, "must not go below 0"),
        ("preferred_batch_sizes", [[], [3]], "divisors of the max batch size"),
        ("preferred_batch_sizes", [[1], [1]], "each set once"),
        ("preferred_batch_sizes", [[1]], "must list \\[\\] \\(no preferred sizes\\)"),
        ("preferred_batch_sizes", "yes", "must be true, false, or a list"),
    ],
)
def test_bad_listed_values_name_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(SpaceError, match=message):
        space_from_dict({field: value})


def test_fit_params_keeps_what_the_space_can_propose_and_refuses_the_rest() -> None:
    params = {**baseline_params(LISTED), "max_batch_size": 8, "preferred_batch_sizes": "max", "extra": 1}
    assert fit_params(LISTED, params, cores=CORES) == {k: v for k, v in params.items() if k != "extra"}
    assert fit_params(LISTED, {**params, "max_batch_size": 16}, cores=CORES) is None
    assert (
        fit_params(LISTED, baseline_params(SPACES["cpu"]), cores=CORES) is None
    )  # another encoding of the same field
    assert fit_params(SPACES["cpu"], baseline_params(SPACES["cpu"]), cores=CORES) == baseline_params(
        SPACES["cpu"]
    )


def test_starting_points_are_the_baseline_with_batching_turned_up() -> None:
    from optimizer.config.space import starting_points

    cpu = SPACES["cpu"]
    batching, lowp = starting_points(cpu, ("batching", "batching-lowp"))
    first = suggest_candidate(optuna.trial.FixedTrial(batching), cpu, batching=True, cores=CORES)
    second = suggest_candidate(optuna.trial.FixedTrial(lowp), cpu, batching=True, cores=CORES)
    assert first == Candidate(max_batch_size=32, preferred_batch_sizes=(32,), max_queue_delay_us=1000)
    assert second == Candidate(
        precision="int8", max_batch_size=32, preferred_batch_sizes=(32,), max_queue_delay_us=1000
    )
    listed = suggest_candidate(
        optuna.trial.FixedTrial(starting_points(LISTED, ("batching",))[0]), LISTED, batching=True, cores=CORES
    )
    assert (listed.max_batch_size, listed.preferred_batch_sizes, listed.max_queue_delay_us) == (
        32,
        (32,),
        5000,
    )
    assert starting_points(NARROW, ("batching", "batching-lowp")) == []  # nothing to turn up
    with pytest.raises(SpaceError, match="unknown starting point 'fast'"):
        starting_points(cpu, ("fast",))


def test_the_variants_starting_points_give_every_provider_and_precision_a_batching_config() -> None:
    from optimizer.config.space import starting_points

    space = space_from_dict(
        {
            "execution_providers": ["cpu", "openvino"],
            "precisions": ["fp32", "fp16", "int8"],
            "max_batch_size": [1, 32],
        }
    )
    points = starting_points(space, ("variants",))
    candidates = [
        suggest_candidate(optuna.trial.FixedTrial(p), space, batching=True, cores=CORES) for p in points
    ]
    assert sorted((c.provider, c.precision) for c in candidates) == sorted(
        (provider, precision) for provider in ("cpu", "openvino") for precision in ("fp32", "fp16", "int8")
    )
    assert all(c.max_batch_size == 32 and c.preferred_batch_sizes == (32,) for c in candidates)
    # Another name asking for one of the same configs adds nothing twice.
    assert starting_points(space, ("variants", "batching")) == points


def test_session_options_are_searched_only_where_a_space_lists_them() -> None:
    listed = space_from_dict(
        {"execution_modes": ["sequential", "parallel"], "cpu_mem_arenas": ["enabled", "disabled"]}
    )
    params = {**baseline_params(listed), "execution_mode": "parallel", "cpu_mem_arena": "disabled"}
    candidate = suggest_candidate(optuna.trial.FixedTrial(params), listed, batching=True, cores=CORES)
    assert (candidate.execution_mode, candidate.cpu_mem_arena) == ("parallel", "disabled")
    assert "exec=parallel" in candidate.summary() and "arena=off" in candidate.summary()
    baseline = suggest_candidate(
        optuna.trial.FixedTrial(baseline_params(listed)), listed, batching=True, cores=CORES
    )
    assert (baseline.execution_mode, baseline.cpu_mem_arena) == ("sequential", "enabled")
    assert listed.to_dict()["execution_modes"] == ["sequential", "parallel"]
    # A space that does not list them searches neither, and stores the same as before they existed.
    assert (
        "execution_modes" not in SPACES["cpu"].to_dict() and "cpu_mem_arenas" not in SPACES["cpu"].to_dict()
    )
    with pytest.raises(SpaceError, match="execution_modes must include sequential"):
        space_from_dict({"execution_modes": ["parallel"]})
    with pytest.raises(SpaceError, match="cpu_mem_arenas"):
        space_from_dict({"cpu_mem_arenas": ["off"]})


# --- instances share the cores unless the space asks for more -------------------------------------


@pytest.mark.parametrize("cores", [1, 2, 4, 16])
def test_a_cpu_space_never_proposes_more_threads_than_cores_unless_it_oversubscribes(cores: int) -> None:
    space = SPACES["cpu"]
    assert space.oversubscribe is False
    study = _study()
    seen = set()
    for _ in range(60):
        candidate = suggest_candidate(study.ask(), space, batching=True, cores=cores)
        threads = candidate.intra_op_threads or cores  # 0: ONNX Runtime's default, a thread per core
        assert candidate.instance_count * threads <= cores, candidate
        assert candidate.intra_op_threads == derived_threads(candidate.instance_count, cores)
        seen.add(candidate.instance_count)
    assert seen == set(range(1, min(4, cores) + 1))  # the space's 1-4 instances, capped at the cores


def test_derived_threads_split_the_cores_between_the_instances() -> None:
    assert [derived_threads(instances, 4) for instances in (1, 2, 3, 4)] == [0, 2, 1, 1]
    assert derived_threads(2, 2) == 1 and derived_threads(1, 2) == 0


def test_a_space_that_oversubscribes_searches_threads_and_instances_as_given() -> None:
    space = space_from_dict({"instance_count": [1, 4], "intra_op_threads": [0, 4], "oversubscribe": True})
    study = _study()
    candidates = [suggest_candidate(study.ask(), space, batching=True, cores=2) for _ in range(60)]
    assert any(c.instance_count * (c.intra_op_threads or 2) > 2 for c in candidates)


def test_searched_threads_without_oversubscribe_are_refused_with_the_fix() -> None:
    with pytest.raises(SpaceError, match="oversubscribe: true to search threads"):
        space_from_dict({"intra_op_threads": [0, 4]})
    with pytest.raises(SpaceError, match="oversubscribe must be true or false"):
        space_from_dict({"oversubscribe": "sometimes"})


def test_the_grid_of_a_shared_core_space_has_no_thread_parameter() -> None:
    space = space_from_dict(
        {
            "max_batch_size": {"choices": [1, 8]},
            "max_queue_delay_us": 0,
            "instance_count": {"choices": [1, 2, 4]},
        }
    )
    grid = grid_of(space, cores=2)
    assert "intra_op_threads" not in grid and grid["instance_count"] == [1, 2]
