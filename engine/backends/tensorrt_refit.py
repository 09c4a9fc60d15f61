"""New weights for a built TensorRT engine, by ONNX initializer name, with trt.Refitter.

The ONNX parser names each weight after the ONNX initializer it came from, so a refit takes the same
names the build recorded per artefact (the manifest's `"weights": {param_name: onnx_initializer_name}`).
The plan must have been built with BuilderFlag.REFIT (export.tensorrt_build does by default): a plan
built without it has no refittable weights, and is refused here with that reason. Where the builder
combined weights (a bias folded into a neighbour, say), TensorRT needs every weight of the combination:
`get_missing_weights` names them, and the refit is refused before it starts, naming them too.

The arrays must keep the dtype and element count the weights had at the build (fp16 in an fp16 plan);
TensorRT reads them during `refit_cuda_engine`, so they are kept alive until it returns.
"""
from __future__ import annotations

import numpy as np


def refit(trt, engine, named: dict, logger, what: str) -> None:
    """Replace the weights `named` (initializer name -> numpy array) in `engine`, or raise saying why not."""
    if not named:
        return
    refitter = trt.Refitter(engine, logger)
    refittable = set(refitter.get_all_weights())
    if not refittable:
        raise ValueError(f"{what}: this TensorRT plan has no refittable weights (built without BuilderFlag.REFIT): "
                         "rebuild the engine dir with python -m engine.build --backend tensorrt")
    unknown = sorted(set(named) - refittable)
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} of the {len(named)} names are not refittable weights of this plan, "
                         f"e.g. {unknown[:3]}; it has {len(refittable)}, e.g. {sorted(refittable)[:3]}")
    kept = []  # TensorRT reads the arrays' memory until refit_cuda_engine returns
    for name, value in named.items():
        array = np.ascontiguousarray(value)
        if array.dtype not in (np.float32, np.float16):
            raise ValueError(f"{what}: weight {name!r} is {array.dtype}; give it in the plan's dtype (float32 or float16)")
        kept.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise ValueError(f"{what}: TensorRT refused new weights for {name!r} ({array.dtype}, shape {array.shape}, "
                             f"{array.size} elements): count and dtype must be those of the build")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise ValueError(f"{what}: TensorRT needs {len(missing)} more weights for this refit (combined with the ones "
                         f"given when the plan was built): {sorted(missing)[:8]}; pass them too (their current values "
                         "if unchanged)")
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"{what}: TensorRT's refit_cuda_engine failed (see the TensorRT log above); the engine "
                           "may hold a mix of old and new weights: set the weights again or reload the engine dir")
