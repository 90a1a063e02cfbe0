"""ONNX Runtime's transformer graph optimizer: attention, LayerNorm and GELU fusions in the file itself.

Used for the ``fp32-fused`` variant and as the input of the fused int8 recipes
(:mod:`optimizer.model.quantize`): fusing before quantizing keeps the bias and normalisation inside the
fused kernels, and leaves the quantizer fewer, larger operators.
"""

from __future__ import annotations

import logging
from pathlib import Path

from optimizer.errors import ModelError

__all__ = ["NOTHING_TO_FUSE", "fuse_transformer"]

NOTHING_TO_FUSE = "ONNX Runtime's transformer optimizer found nothing to fuse"


def fuse_transformer(source: Path, target: Path) -> dict[str, int]:
    """Write ``source`` with its transformer patterns fused to ``target``; the fused ops and their counts.

    bert-type fusions with opt_level 0 (only the Python fusions), so the file holds no kernels the
    server's older ONNX Runtime lacks; the server applies its own graph optimizations at load as for any
    model. Raises ModelError when no pattern it knows is found (nothing to gain from the variant).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    # It warns on the root of its loggers that the model was not exported by PyTorch: true, and not ours
    # to fix; the user's terminal is kept for our own lines.
    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        optimized = optimize_model(str(source), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
    finally:
        logger.setLevel(level)
    fused = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    if not fused:
        raise ModelError(f"{NOTHING_TO_FUSE} (no attention, LayerNorm or GELU pattern it knows)")
    optimized.save_model_to_file(str(target))
    return fused
