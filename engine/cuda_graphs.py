"""The denoising step as one CUDA graph per shape key (its torch.compile is engine/compile.py).

The step is one plain function over tensors (TorchBackend.step_fn):

    eps = step(sample, t, cond, control_sample, control_cond, hints, scales)

every active ControlNet, the residual combine (or the fused zero-conv path) and the UNet, with the set of
active nets fixed per key. `StepGraphs` captures it once per `StepKey` into fixed input buffers and
replays it: each call copies the inputs into those buffers, replays, and copies the output out, so a
caller never holds the graph's memory (the next replay overwrites it). As in stable-fast's
cuda/graphs.py:
- one graph per key; the key holds everything that changes the graph's kernels or shapes: batch,
  latent height and width, which nets run, guess mode (the ControlNets see half the batch) and dtype;
- one memory pool shared by all of a shape's graphs (they never run at once), so a guidance window
  that switches the active set mid-generation costs one more capture, not twice the memory;
- warm-up on a side stream before capture (cuDNN/cuBLAS/Triton autotuning and lazy allocations must
  not happen inside the capture);
- graphs dropped when the shape (batch, size, dtype) changes, and their pool with them.
The scales, timestep, hints and conditioning (a dict of named tensors) are buffers, not constants: new values
never re-capture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

WARMUP_CALLS = 2  # the first call autotunes and allocates; the second runs as the capture will


@dataclass(frozen=True)
class StepKey:
    batch: int
    height: int  # latent size
    width: int
    nets: tuple[int, ...]  # indices of the active ControlNets, in order
    guess: bool  # ControlNets see the conditional half only
    dtype: torch.dtype

    @property
    def shape(self) -> tuple:
        """What, when it changes, makes every captured graph stale (sizes and dtype, not the net set)."""
        return self.batch, self.height, self.width, self.dtype


def step_key(nets, sample: torch.Tensor, control_sample: torch.Tensor, dtype: torch.dtype) -> StepKey:
    b, _, h, w = sample.shape
    return StepKey(b, h, w, tuple(nets), control_sample.shape[0] != b, dtype)


def _clone_tree(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    return [_clone_tree(v) for v in x]


def _copy_tree(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
        return
    if isinstance(dst, dict):
        for k, d in dst.items():
            _copy_tree(d, src[k])
        return
    for d, s in zip(dst, src):
        _copy_tree(d, s)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list  # the fixed buffers the graph reads (tensors, and lists and dicts of tensors)
    output: torch.Tensor  # the buffer the graph writes


class StepGraphs:
    """`fn(key, *inputs)` replayed from one CUDA graph per key; see the module docstring."""

    def __init__(self, fn: Callable, device: torch.device):
        self.fn = fn
        self.device = torch.device(device)
        self.graphs: dict[StepKey, _Captured] = {}
        self.shape = None
        self.pool = None
        self.captures = 0  # how many graphs were captured over this object's life (tests, benchmarks)

    def drop(self) -> None:
        """Forget every graph and its memory pool."""
        self.graphs.clear()
        self.pool = None
        self.shape = None

    def __call__(self, key: StepKey, *inputs) -> torch.Tensor:
        if key.shape != self.shape:
            self.drop()
            self.shape = key.shape
            self.pool = self._new_pool()
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(key, inputs)
        else:
            _copy_tree(entry.inputs, inputs)
        entry.graph.replay()
        return entry.output.clone()  # copied out: the next replay overwrites entry.output

    def _capture(self, key: StepKey, inputs) -> _Captured:
        static = _clone_tree(list(inputs))  # outside the pool: they must outlive every replay
        graph, output = self._record(key, static)
        self.captures += 1
        return _Captured(graph, static, output)

    # The two CUDA-specific pieces, apart so the keying and copying above are testable on a CPU.

    def _new_pool(self):
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {str(self.device)!r}")
        return torch.cuda.graph_pool_handle()

    def _record(self, key: StepKey, static: list):
        """Warm up on a side stream, then capture fn over the fixed buffers: (graph, output buffer)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.fn(key, *static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(key, *static)
        return graph, output
