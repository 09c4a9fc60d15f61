"""torch module -> one clean, checked ONNX graph (plus one external-data file when it is large).

Exporter: the legacy TorchScript exporter (`dynamo=False`, opset 17), chosen deliberately. Measured on
torch 2.13 (shared/FACTS.md): tiny graphs 0.5-0.75 s against 16-26 s with dynamo, full ControlNet 24 s
against 40 s, full UNet 41 s against 109 s; ONNX Runtime matches torch to 1e-6 (tiny) / 2e-5 (full) with
either. The dynamo exporter would also need hand-written `dynamic_shapes` with derived dims for the
UNet's 13 residual inputs, where the legacy one takes the spec's `dynamic_axes` as they are. Its two
costs are handled here: it is deprecated (its warning is silenced at the call; `EXPORTER` is in every
cache key, so moving to dynamo later rebuilds everything), and at full size it writes one file per
weight (385 for the UNet), which the re-save below folds into one `<name>.onnx.data`.

Clean-up is onnxslim (maintained; constant folding, dead-node and redundant-op removal, shape
inference). It is a named step, switchable with `ExportConfig.slim`, because it is the one step that
rewrites the graph; `onnx.checker` then runs on the saved file (a path, so graphs over 2 GB work).
"""
from __future__ import annotations

import copy
import gc
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from export.spec import ModelSpec

EXPORTER = "torchscript-legacy"


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17
    slim: bool = True  # onnxslim clean-up
    external_data_bytes: int = 1 << 30  # weights above this go to <name>.onnx.data (protobuf's hard limit is 2 GiB)

    def key(self) -> dict:
        """What of the export goes into cache keys."""
        return dict(exporter=EXPORTER, opset=self.opset, slim=self.slim, external=self.external_data_bytes)


class CastOutputs(torch.nn.Module):
    """Runs a module as it is and casts its outputs: an fp16 graph interface around fp32 insides.

    Used for the fp16 text encoders (SDXL's two alike): the legacy exporter turns transformers' CLIP in half
    precision into a LayerNormalization fed fp32 and fp16 at once, which ONNX Runtime and OpenVINO refuse to
    load. The text encoders run once per generation, so keeping them fp32 inside costs nothing that matters.
    """

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args):
        out = self.module(*args)
        return tuple(o.to(self.dtype) for o in out) if isinstance(out, tuple) else out.to(self.dtype)


def export_device(precision: str) -> torch.device:
    """Where to trace: fp16 on a CUDA GPU when there is one (the CPU's fp16 kernels are emulated and the
    full-size fp16 UNet traces for minutes there), else the CPU."""
    return torch.device("cuda") if precision == "fp16" and torch.cuda.is_available() else torch.device("cpu")


def for_precision(module: torch.nn.Module, kind: str, precision: str) -> torch.nn.Module:
    """The module to export for a precision (a copy: the fp32 original stays the verification reference)."""
    if precision == "fp32":
        return module
    if kind in ("text_encoder", "text_encoder_2"):  # SDXL's second CLIP has the same LayerNorms
        return CastOutputs(copy.deepcopy(module).to(export_device(precision)), torch.float16)
    return copy.deepcopy(module).to(export_device(precision), torch.float16)


def _weight_bytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def torch_export(module: torch.nn.Module, spec: ModelSpec, args: tuple, path: Path, opset: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter is deprecated (see the module docstring for why it is still the right one).
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning, torch.jit.TracerWarning))
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[io.name for io in spec.inputs],
            output_names=[io.name for io in spec.outputs],
            dynamic_axes=spec.dynamic_axes(),
            do_constant_folding=True,
        )


PROTOBUF_LIMIT = 2**31 - 1


def slim(model):
    """onnxslim's clean-up; graph inputs and outputs keep their names.

    Over protobuf's 2 GiB limit (the fp32 UNet) its shape inference cannot run: onnxslim 0.1.98 serialises
    the model for it and fails ("Failed to serialize proto"). Constant folding and the other graph passes
    still run there; only the value_info annotations are left out, which neither ONNX Runtime nor
    TensorRT needs.
    """
    import onnxslim

    return onnxslim.slim(model, no_shape_infer=_weight_bytes(model) >= PROTOBUF_LIMIT)


def save(model, path: Path, external_data_bytes: int) -> list[Path]:
    """Write the graph (and one external-data file when its weights are large); returns the files."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    if _weight_bytes(model) > external_data_bytes:
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, str(path))
    return [path]


def check_io(model, spec: ModelSpec) -> None:
    """The graph's inputs and outputs are exactly the spec's, in order: the runtime binds by these names,
    so a wrapper returning other outputs, or an exporter pruning an unused input, must fail here."""
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    want_in, want_out = [io.name for io in spec.inputs], [io.name for io in spec.outputs]
    if inputs != want_in or outputs != want_out:
        raise ValueError(f"{spec.name}: exported graph has I/O {inputs} -> {outputs}, the spec says {want_in} -> {want_out}")


def export(module: torch.nn.Module, spec: ModelSpec, args: tuple, work_dir: Path, config: ExportConfig) -> list[Path]:
    """Export, clean, save and check `spec.name`.onnx in `work_dir` (a scratch dir); returns its files."""
    import onnx

    raw = work_dir / "raw" / "model.onnx"
    torch_export(module, spec, args, raw, config.opset)
    model = onnx.load(str(raw))  # pulls in the legacy exporter's per-weight files, if any
    shutil.rmtree(raw.parent)
    if config.slim:
        model = slim(model)
        # onnxslim's graph (nodes and tensors referring to each other, numpy copies of the constants it
        # read) is only freed by the cycle collector; collected now, not during save: the fp32 UNet's
        # build peaked at 18.3 GiB RSS without this (15.4 with it).
        gc.collect()
    check_io(model, spec)
    files = save(model, work_dir / f"{spec.name}.onnx", config.external_data_bytes)
    del model
    onnx.checker.check_model(str(files[0]))
    return files
