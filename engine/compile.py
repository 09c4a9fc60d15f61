"""torch.compile of the denoising step (TorchOptimizations.compile / freeze_weights).

The step is TorchBackend.step_fn, the same plain function engine/cuda_graphs.py captures; compiling it
changes nothing the loop sees. Compiler flags are set per call, never at import.
"""
from __future__ import annotations

from typing import Callable

import torch


def compile_step(fn: Callable, freeze_weights: bool = False) -> Callable:
    """torch.compile of the step (inductor, default mode: no autotuning, no inductor CUDA graphs, which
    would fight StepGraphs' own). Inductor flags go in as this compilation's options, never into the
    global config.

    Freezing (TorchOptimizations.freeze_weights says what it buys) cannot be such an option: dynamo
    decides whether the parameters become constants while it traces, from the global
    `torch._inductor.config.freezing` (torch._dynamo.utils.is_parameter_freezing), and with the option
    the weights stayed graph inputs and no conv or linear was pre-packed. So every call of the frozen
    step patches that flag for its own duration (tracing and recompiles happen inside a call), and
    restores it after."""
    options = {
        # 1x1 convs (the attention blocks' proj_in/proj_out, the zero convs off the fused path) as matmuls,
        # which inductor can fuse with their neighbours: diffusion-fast's recipe.
        "conv_1x1_as_mm": True,
    }
    compiled = torch.compile(fn, fullgraph=False, dynamic=False, options=options)
    if not freeze_weights:
        return compiled
    from torch._inductor import config as inductor_config

    def frozen_step(*args):
        with inductor_config.patch(freezing=True):
            return compiled(*args)

    return frozen_step
