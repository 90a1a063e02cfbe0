"""The precisions a study may propose: each variant behind the accuracy guard, decided once per study.

A variant (fp16, or int8 by the first recipe that keeps the outputs close) that breaks accuracy or
cannot be made is recorded in the study (``variants``) with its reason and left out of the space.
"""

from __future__ import annotations

from dataclasses import replace

from optimizer.config.space import SearchSpace
from optimizer.errors import ModelError
from optimizer.model.accuracy import check_variant
from optimizer.model.intake import ModelInfo
from optimizer.model.quantize import DEFAULT_INT8_RECIPE
from optimizer.model.variants import Int8Choice, choose_int8, variant_path
from optimizer.paths import cache_dir

__all__ = ["accurate_precisions", "int8_recipe_of"]


def accurate_precisions(
    study,
    model: ModelInfo,
    space: SearchSpace,
    samples,
    tolerance: float,
    reporter,
    int8_recipes: tuple[str, ...] | None = None,
) -> SearchSpace:
    """The space without the precisions whose variant breaks accuracy or cannot be made: never proposed.

    Each variant's figures are recorded in the study (``variants``) once and reused on resume, so the
    space, and with it every trial's parameter distributions, stays the same across restarts. int8 is
    the first recipe (optimizer.model.quantize) that passes the guard; its record says which, and why
    the recipes before it were refused.
    """
    variants = dict(study.user_attrs.get("variants", {}))
    kept = []
    for precision in space.precisions:
        if precision == "fp32":
            kept.append(precision)
            continue
        if precision not in variants:
            variants[precision] = _variant_record(model, precision, samples, tolerance, int8_recipes)
        record = variants[precision]
        if record["ok"]:
            kept.append(precision)
            refused = [a for a in record.get("attempts", []) if not a.get("ok")]
            if refused:  # the default recipe was not enough: say what is served and why
                reasons = "; ".join(f"{a['recipe']}: {a['reason']}" for a in refused)
                reporter.note(f"int8 serves the {record['recipe']} recipe ({reasons})")
        else:
            reporter.note(f"{record['reason']}: it will not be tried")
    study.set_user_attr("variants", variants)
    study.set_user_attr("accuracy_tolerance", tolerance)
    return replace(space, precisions=tuple(kept))


def _variant_record(
    model: ModelInfo, precision: str, samples, tolerance: float, int8_recipes: tuple[str, ...] | None
) -> dict:
    """What the accuracy guard found for one precision's variant (int8: over its recipes)."""
    if precision == "int8":
        choice = choose_int8(model, samples, tolerance, cache_dir(), int8_recipes)
        return _int8_record(choice)
    try:
        path = variant_path(model, precision, cache_dir())
    except ModelError as exc:  # e.g. a converter that does not handle one of the model's ops
        return {"precision": precision, "ok": False, "reason": str(exc)}
    return check_variant(model.path, path, samples, precision, tolerance).to_dict()


def _int8_record(choice: Int8Choice) -> dict:
    attempts = [dict(attempt) for attempt in choice.attempts]
    if choice.recipe is not None:
        passed = next(a for a in attempts if a["recipe"] == choice.recipe)
        return {**passed, "attempts": attempts}
    measured = [a for a in attempts if "cosine" in a]
    closest = max(measured, key=lambda a: a["cosine"], default={})
    return {
        **closest,
        "precision": "int8",
        "ok": False,
        "recipe": None,
        "reason": f"no int8 recipe kept the outputs within the tolerance ({choice.reasons()})",
        "attempts": attempts,
    }


def int8_recipe_of(study) -> str:
    """The int8 recipe a study serves (the default for a study from before recipes, or without int8)."""
    record = study.user_attrs.get("variants", {}).get("int8") or {}
    return record.get("recipe") or DEFAULT_INT8_RECIPE
