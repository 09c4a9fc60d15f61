"""The TensorRT builder, runtime and refitter against per-version fakes (tests/trt_fakes.py), 10.x and 11.x.

Shown for both versions: fp32 and fp16 builds clear TF32, are strongly typed and never set a precision
flag, are refittable; a -1 optimisation profile, a refused timing cache, a refused tensor address, a
shape outside the profile and an engine whose I/O differs from the manifest raise errors naming the
problem; a misaligned input (a view) is copied to an aligned one with its contents; the CUDA-graph cache
is per model, LRU-capped, UNet/ControlNet only, and falls back to plain runs when capture fails. Runs
on the CPU: the fake engine records addresses and reads the input bytes at "execution".
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backends import check_request
from engine.backends.tensorrt_backend import TrtModel, TrtRunConfig, TrtRuntime, process_logger, trt_major
from engine.manifest import Artefact, TensorIO
from export import tensorrt_build as tb
from tests.trt_fakes import PRECISION_FLAGS, DataType, TensorIOMode, fake_tensorrt

MAJORS = [10, 11]
PROFILE = {"sample": [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 16, 16]], "timestep": [[1], [1], [1]]}


# ---- the fakes themselves are per version --------------------------------------------------------------


def test_fakes_match_each_versions_api():
    trt10, _ = fake_tensorrt(10)
    trt11, _ = fake_tensorrt(11)
    assert trt10.__version__ == "10.9.0.34" and len(trt11.__version__.split(".")) == 4
    assert int(trt10.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) == 0
    assert int(trt10.NetworkDefinitionCreationFlag.STRONGLY_TYPED) == 1
    assert not hasattr(trt11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert hasattr(trt10.BuilderFlag, "FP16") and hasattr(trt10.BuilderFlag, "BF16")
    assert not any(hasattr(trt11.BuilderFlag, f) for f in PRECISION_FLAGS)
    for trt in (trt10, trt11):
        assert {"TF32", "REFIT", "REFIT_IDENTICAL"} <= set(trt.BuilderFlag.__members__)
        assert trt.Builder(None).create_builder_config().get_flag(trt.BuilderFlag.TF32)  # on by default
    assert [trt_major(v) for v in ("10.9.0.34", "11.4.0.9")] == [10, 11]
    with pytest.raises(ValueError, match="TensorRT 8.6.1.6 is too old"):
        trt_major("8.6.1.6")


# ---- building ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("major", MAJORS)
def test_build_is_strongly_typed_without_tf32_and_refittable(tmp_path, major, precision):
    trt, calls = fake_tensorrt(major, graph_inputs=list(PROFILE))
    cache = tmp_path / "timing.cache"
    for name in ("a", "b"):  # two plans, one process: one logger
        tb.build_plan(tmp_path / f"{name}.onnx", tmp_path / f"{name}.plan", PROFILE, precision,
                      tb.TrtBuildConfig(timing_cache=cache), trt=trt)
    assert (tmp_path / "b.plan").read_bytes() == b"PLAN" and cache.read_bytes() == b"TIMING"
    network, config = calls["networks"][-1], calls["configs"][-1]
    assert network.strongly_typed
    assert network.creation_flags == (1 << 1 if major == 10 else 0)  # 10.x: 1 << STRONGLY_TYPED (= 1)
    assert not config.get_flag(trt.BuilderFlag.TF32)
    assert config.get_flag(trt.BuilderFlag.REFIT) and not config.get_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    assert not any(config.get_flag(getattr(trt.BuilderFlag, f)) for f in PRECISION_FLAGS if hasattr(trt.BuilderFlag, f))
    assert calls["shapes"] == PROFILE and calls["profiles"] == 2
    assert calls["loggers"] == 1 and process_logger(trt) is process_logger(trt)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("major", MAJORS)
def test_build_not_refittable_when_asked(tmp_path, major):
    trt, calls = fake_tensorrt(major, graph_inputs=list(PROFILE))
    tb.build_plan(tmp_path / "x.onnx", tmp_path / "x.plan", PROFILE, "fp16", tb.TrtBuildConfig(refittable=False), trt=trt)
    assert calls["built_refittable"] is False


@pytest.mark.parametrize("major", MAJORS)
def test_build_failures_raise_clearly(tmp_path, major):
    out = tmp_path / "x.plan"
    trt, _ = fake_tensorrt(major, graph_inputs=list(PROFILE), reject_profile=True)
    with pytest.raises(ValueError, match="rejected the optimisation profile"):
        tb.build_plan(tmp_path / "x.onnx", out, PROFILE, "fp16", trt=trt)
    trt, _ = fake_tensorrt(major, graph_inputs=list(PROFILE), cache_mismatch=True)
    with pytest.raises(RuntimeError, match="refused the timing cache .*delete it"):
        tb.build_plan(tmp_path / "x.onnx", out, PROFILE, "fp16", tb.TrtBuildConfig(timing_cache=tmp_path / "t"), trt=trt)
    trt, _ = fake_tensorrt(major, parse_ok=False)
    with pytest.raises(RuntimeError, match="No importer registered for op: FancyOp"):
        tb.build_plan(tmp_path / "x.onnx", out, PROFILE, "fp32", trt=trt)
    trt, _ = fake_tensorrt(major, graph_inputs=["sample", "timestep", "extra"])
    with pytest.raises(ValueError, match=r"inputs \['extra', 'sample', 'timestep'\] are not the profile's"):
        tb.build_plan(tmp_path / "x.onnx", out, PROFILE, "fp32", trt=trt)
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, got 'int8'"):
        tb.build_plan(tmp_path / "x.onnx", out, PROFILE, "int8", trt=trt)
    assert not out.exists()


def test_fp16_flag_on_a_strongly_typed_network_fails_in_the_fake():
    """The fake enforces what TensorRT 10 does, so the build tests above would catch a stray FP16 flag."""
    trt, _ = fake_tensorrt(10)
    builder = trt.Builder(None)
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    assert builder.build_serialized_network(builder.create_network(1 << 1), config) is None


# ---- running -------------------------------------------------------------------------------------------

F32 = "float32"
ARTEFACT_IO = dict(
    inputs=[TensorIO("sample", F32, ("B", 4, "h", "w")), TensorIO("timestep", F32, (1,)),
            TensorIO("encoder_hidden_states", F32, ("B", 77, 32))],
    outputs=[TensorIO("noise_pred", F32, ("B", 4, "h", "w"))],
)
RUN_PROFILE = {"sample": ([1, 4, 8, 8], None, [4, 4, 16, 16]), "timestep": ([1], None, [1]),
               "encoder_hidden_states": ([1, 77, 32], None, [4, 77, 32])}


def artefact(kind="unet") -> Artefact:
    return Artefact(name=kind, kind=kind, net=None, onnx=f"{kind}.onnx", files={}, profile={}, key="k", plan=f"{kind}.plan",
                    **ARTEFACT_IO)


def engine_io(**changes):
    """The plan's view of ARTEFACT_IO: (name, mode, dtype, shape with -1 where dynamic)."""
    io = [("sample", TensorIOMode.INPUT, DataType.FLOAT, (-1, 4, -1, -1)), ("timestep", TensorIOMode.INPUT, DataType.FLOAT, (1,)),
          ("encoder_hidden_states", TensorIOMode.INPUT, DataType.FLOAT, (-1, 77, 32)),
          ("noise_pred", TensorIOMode.OUTPUT, DataType.FLOAT, (-1, 4, -1, -1))]
    return [changes.get(t[0], t) for t in io]


def same_as_sample(name, input_shapes):
    return input_shapes["sample"]


def runtime_and_model(tmp_path, major, kind="unet", io=None, output_shape=same_as_sample, graphs=False, **fake):
    trt, calls = fake_tensorrt(major, engine_io=io or engine_io(), **fake)
    runtime = TrtRuntime(trt, TrtRunConfig(cuda_graphs=graphs, max_graphs_per_model=2), device=torch.device("cpu"))
    runtime.runtime.engine_setup = (RUN_PROFILE, output_shape)
    plan = tmp_path / f"{kind}.plan"
    plan.write_bytes(b"PLAN")
    return runtime, TrtModel(runtime, plan, artefact(kind)), calls


def misaligned(*shape) -> torch.Tensor:
    """Random float32 values in a view whose address is 128 bytes off a multiple of 256."""
    numel = int(np.prod(shape))
    buffer = torch.randn(numel + 128)
    start = ((128 - buffer.data_ptr()) % 256) // 4
    view = buffer[start:start + numel].view(shape)
    assert view.data_ptr() % 256 == 128
    return view


def feeds(batch=2, size=8, embeddings=None):
    g = torch.Generator().manual_seed(0)
    return dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=embeddings if embeddings is not None else torch.randn(batch, 77, 32, generator=g))


@pytest.mark.parametrize("major", MAJORS)
def test_run_binds_by_name_and_misaligned_views_are_copied(tmp_path, major):
    runtime, model, calls = runtime_and_model(tmp_path, major)
    runtime.allocate_shared_memory()
    cond = misaligned(2, 77, 32)  # like guess mode's embeddings[batch:], a view 128 bytes off 256
    (out,) = model.run(feeds(embeddings=cond))
    context = calls["contexts"][0]
    assert context.strategy == runtime.trt.ExecutionContextAllocationStrategy.USER_MANAGED
    assert context.memory == (runtime.shared.data_ptr(), 1024)
    assert all(ptr % 256 == 0 for ptr in context.addresses.values())
    assert context.addresses["encoder_hidden_states"] != cond.data_ptr()
    run = context.executed[-1]
    assert run["stream"] == 0 and run["inputs"]["encoder_hidden_states"] == cond.numpy().tobytes()
    assert out.shape == (2, 4, 8, 8) and context.addresses["noise_pred"] == out.data_ptr()


@pytest.mark.parametrize("major", MAJORS)
def test_refused_address_and_shapes_raise(tmp_path, major):
    _, model, _ = runtime_and_model(tmp_path, major)
    inputs = model._prepare(feeds())  # aligned
    inputs[2] = misaligned(2, 77, 32)  # bound without the copy
    with pytest.raises(RuntimeError, match="refused the address of 'encoder_hidden_states' .*128 bytes off its 256-byte"):
        model._bind(model.context, inputs)
    with pytest.raises(ValueError, match=r"input 'sample' shape \(2, 4, 32, 32\) is outside the plan's profile"):
        model.run(feeds(size=32))
    _, model, _ = runtime_and_model(tmp_path, major, output_shape=lambda name, shapes: (2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"output 'noise_pred' is \(2, 4, 4, 4\) in the plan .*gives \(2, 4, 8, 8\)"):
        model.run(feeds())


@pytest.mark.parametrize("wrong, match", [
    (("noise_pred", TensorIOMode.INPUT, DataType.FLOAT, (-1, 4, -1, -1)), "'noise_pred' is TensorIOMode.INPUT in the plan"),
    (("sample", TensorIOMode.INPUT, DataType.HALF, (-1, 4, -1, -1)), "'sample' is DataType.HALF in the plan, float32"),
    (("encoder_hidden_states", TensorIOMode.INPUT, DataType.FLOAT, (-1, 77, 768)), r"shape \(-1, 77, 768\) in the plan"),
])
@pytest.mark.parametrize("major", MAJORS)
def test_engine_io_checked_against_the_manifest_at_load(tmp_path, major, wrong, match):
    with pytest.raises(ValueError, match=match):
        runtime_and_model(tmp_path, major, io=engine_io(**{wrong[0]: wrong}))


class FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@pytest.mark.parametrize("major", MAJORS)
def test_cuda_graphs_per_model_lru_and_fallback(tmp_path, major, monkeypatch):
    """Only UNet and ControlNet bodies capture; at most max_graphs_per_model (2 here), least recently used
    dropped; a failed capture warns and that shape runs plainly from then on."""
    _, text, _ = runtime_and_model(tmp_path, major, kind="text_encoder", graphs=True)
    runtime, unet, calls = runtime_and_model(tmp_path, major, kind="unet", graphs=True)
    assert not text.use_graphs and unet.use_graphs
    captured = []

    def capture(inputs):
        if inputs[0].shape[0] == 3:
            raise RuntimeError("operation not permitted when stream is capturing")
        captured.append(tuple(inputs[0].shape))
        static_in = [t.clone() for t in inputs]
        return FakeGraph(), None, static_in, [torch.zeros_like(static_in[0])]

    monkeypatch.setattr(unet, "_capture", capture)
    for batch in (1, 2, 1, 4):
        unet.run(feeds(batch=batch))
    assert captured == [(1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8)]
    assert [k[0][0] for k in unet.graphs] == [1, 4]  # 2 was least recently used
    assert unet.graphs[next(iter(unet.graphs))][0].replays == 2
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed at input shapes"):
        (out,) = unet.run(feeds(batch=3))
    assert out.shape == (3, 4, 8, 8) and calls["contexts"][0].executed  # ran plainly
    unet.run(feeds(batch=3))  # no second capture attempt, no warning
    assert len(captured) == 3 and len(unet.uncapturable) == 1
    runtime.release(unet)
    assert unet.engine is None and not unet.graphs and runtime.shared is None


def test_request_checked_against_the_plans_range():
    class Plans:
        name = "tensorrt"
        sizes = dict(min_size=256, opt_size=512, max_size=768, max_batch=2)

    check_request(Plans(), 2, 256, 768)
    check_request(object(), 64, 8, 4096)  # no sizes: torch and ONNX Runtime take any
    with pytest.raises(ValueError, match="3 images in one call, .*take at most 2: .*--max-batch 3"):
        check_request(Plans(), 3, 512, 512)
    with pytest.raises(ValueError, match="width 1024 is outside .*range 256-768 px"):
        check_request(Plans(), 1, 512, 1024)


# ---- refitting -----------------------------------------------------------------------------------------

WEIGHTS = ("unet.conv_in.weight", "unet.conv_in.bias", "onnx::MatMul_901")


@pytest.mark.parametrize("major", MAJORS)
def test_set_initializers_refits_and_drops_graphs(tmp_path, major):
    runtime, model, calls = runtime_and_model(tmp_path, major, refittable_weights=WEIGHTS)
    model.graphs[((1,),)] = ("graph", None, [], [])
    new = {"unet.conv_in.weight": np.random.rand(32, 4, 3, 3).astype(np.float16), "onnx::MatMul_901": np.ones((8, 8), np.float16)}
    model.set_initializers(new)
    refitter = calls["refits"][-1]
    assert sorted(refitter.set) == sorted(new) and refitter.set["onnx::MatMul_901"].array.dtype == np.float16
    assert not model.graphs


@pytest.mark.parametrize("major", MAJORS)
def test_set_initializers_errors(tmp_path, major):
    one = {"unet.conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)}
    _, model, calls = runtime_and_model(tmp_path, major, refittable_weights=WEIGHTS)
    with pytest.raises(ValueError, match=r"1 of the 1 names are not refittable weights of this plan, e.g. \['down.w'\]"):
        model.set_initializers({"down.w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="weight 'unet.conv_in.weight' is int64; give it in the plan's dtype"):
        model.set_initializers({"unet.conv_in.weight": np.zeros(3, np.int64)})
    _, model, calls = runtime_and_model(tmp_path, major, refittable_weights=WEIGHTS,
                                        combined_weights={"unet.conv_in.weight": "unet.conv_in.bias"})
    with pytest.raises(ValueError, match=r"needs 1 more weights .*\['unet.conv_in.bias'\]"):
        model.set_initializers(one)
    _, model, calls = runtime_and_model(tmp_path, major, refittable_weights=WEIGHTS, refit_ok=False)
    with pytest.raises(RuntimeError, match="refit_cuda_engine failed"):
        model.set_initializers(one)
    _, model, calls = runtime_and_model(tmp_path, major, refittable_weights=WEIGHTS)
    calls["built_refittable"] = False
    model.engine = model.runtime.deserialize(tmp_path / "unet.plan")  # a plan built without REFIT
    with pytest.raises(ValueError, match="no refittable weights .*built without BuilderFlag.REFIT"):
        model.set_initializers(one)
