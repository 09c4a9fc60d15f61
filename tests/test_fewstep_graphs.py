"""Few-step generation on the graph backends (ONNX Runtime, OpenVINO) equals diffusers' ControlNet pipelines,
fp32, max abs <= 1e-4: the LCM and TCD schedulers, each at guidance 1 (every graph at batch 1) and 1.5, a LoRA at
guidance 1.5 (the session's engine dir), and an engine dir built from an LCM-distilled UNet with TAESD
(`python -m engine.build --vae`): the UNet graph's timestep_cond input, TAESD's own encoder and decoder
graphs, text to image against diffusers. TAESD img2img with the LCM UNet has no diffusers counterpart
(its ControlNet img2img pipeline ignores time_cond_proj_dim): there the graphs are held to the torch
backend, which tests/test_fewstep.py holds to diffusers' img2img pipeline with TAESD."""
from __future__ import annotations

import contextlib
import io

import PIL.Image
import pytest
from diffusers import StableDiffusionControlNetPipeline

from engine import manifest as mf
from tests.conftest import GRAPH_BACKENDS, max_errors
from tests.test_build import SIZES, one_torch_thread  # noqa: F401 (autouse fixture)
from tests.test_fewstep import BASE, diffusers_images, lcm_lora, pipeline  # noqa: F401 (lcm_lora: a fixture)

TOL = 1e-4  # fp32, max abs


@pytest.fixture(scope="module")
def control(edges):
    return edges.resize((64, 64))


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return pipeline(StableDiffusionControlNetPipeline, tiny_dir["model"], tiny_dir["canny"])


@pytest.fixture(scope="module")
def runners(engine_dir, tiny_dir):
    from engine import Runner

    made = {}

    def get(backend):
        if backend not in made:
            made[backend] = Runner(engine_dir=str(engine_dir), backend=backend, controlnet=[str(tiny_dir["canny"])])
        return made[backend]

    return get


def check(ours, expected, label):
    abs_err, rel_err = max_errors(ours, expected)
    print(f"fewstep graphs {label}: max abs {abs_err:.2e}, rel {rel_err:.2e}")
    assert abs_err <= TOL, f"{label}: {abs_err:.3g}"


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
# Both schedulers on both batch paths (guidance 1: every graph at batch 1; 1.5: the CFG batch of 2). OpenVINO
# compiles each new shape once (seconds a graph): the second scheduler on a path reuses it.
@pytest.mark.parametrize("guidance", [1.0, 1.5])
@pytest.mark.parametrize("scheduler", ["lcm", "tcd"])
def test_schedulers_match_diffusers(pipe, runners, control, backend, scheduler, guidance):
    kwargs = dict(BASE, guidance_scale=guidance, eta=0.3 if scheduler == "tcd" else 0.0)
    expected = diffusers_images(pipe, scheduler, image=control, **kwargs)
    ours = runners(backend).generate(image=control, scheduler=scheduler, seed=0, output_type="np", preprocess=False,
                                     **kwargs)
    check(ours.images, expected, f"{backend} {scheduler} guidance {guidance}")


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_lora_at_guidance_1_5(tiny_dir, runners, lcm_lora, control, backend):
    """An LCM-LoRA-shaped LoRA (3x3 convs, time embeddings) switched into the graphs without re-export."""
    file = lcm_lora
    lora_pipe = pipeline(StableDiffusionControlNetPipeline, tiny_dir["model"], tiny_dir["canny"])
    lora_pipe.load_lora_weights(str(file), adapter_name="fewstep")
    lora_pipe.fuse_lora()
    kwargs = dict(BASE, guidance_scale=1.5)
    expected = diffusers_images(lora_pipe, "lcm", image=control, **kwargs)
    runner = runners(backend)
    runner.set_loras([(str(file), 1.0)])
    try:
        ours = runner.generate(image=control, scheduler="lcm", seed=0, output_type="np", preprocess=False, **kwargs)
    finally:
        runner.set_loras([])
    check(ours.images, expected, f"{backend} LoRA lcm guidance 1.5")


@pytest.fixture(scope="module")
def lcm_build(tmp_path_factory):
    """The tiny LCM model + canny + TAESD, built once for ONNX Runtime (OpenVINO runs the same files)."""
    from engine.build import main
    from engine.tiny import save_tiny, tiny_taesd

    root = tmp_path_factory.mktemp("fewstep_build")
    paths = save_tiny(root / "lcm", controlnets=("canny",), preset="tiny-lcm")
    paths["taesd"] = root / "taesd"
    tiny_taesd().save_pretrained(paths["taesd"])
    paths["engine"] = root / "engine"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--model", str(paths["model"]), "--controlnet", str(paths["canny"]), "--vae", str(paths["taesd"]),
                     "--out", str(paths["engine"]), "--no-progress"] + SIZES)
    assert code == 0, out.getvalue()
    return paths


def test_lcm_build_records_guidance_input_and_taesd(lcm_build):
    from engine.verify import main as verify

    manifest = mf.load(lcm_build["engine"])
    unet_inputs = [io.name for io in manifest.artefact("unet").inputs]
    assert unet_inputs[:4] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert manifest.config["time_cond_proj_dim"] == 32
    assert "timestep_cond" not in [io.name for io in manifest.artefact("controlnet", "controlnet-canny").inputs]
    (vae,) = manifest.vaes
    assert (vae["name"], vae["tiny"], vae["scaling_factor"]) == ("taesd", True, 1.0)
    assert [io.name for io in manifest.artefact("vae_encoder", "taesd").outputs] == ["latents"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert verify([str(lcm_build["engine"])]) == 0, out.getvalue()
    assert "vae_decoder_taesd" in out.getvalue() and "vae_encoder_taesd" in out.getvalue()


@pytest.fixture(scope="module")
def lcm_runners(lcm_build):
    from engine import Runner

    made = {}

    def get(backend):
        if backend not in made:
            made[backend] = (Runner(model=str(lcm_build["model"]), controlnet=str(lcm_build["canny"]), backend="torch",
                                    device="cpu", vae=str(lcm_build["taesd"])) if backend == "torch"
                             else Runner(engine_dir=str(lcm_build["engine"]), backend=backend, vae="taesd"))
        return made[backend]

    return get


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("vae", ["taesd", "model"])
def test_lcm_unet_and_taesd_text_to_image(lcm_build, lcm_runners, control, backend, vae):
    lcm = pipeline(StableDiffusionControlNetPipeline, lcm_build["model"], lcm_build["canny"],
                   lcm_build["taesd"] if vae == "taesd" else None)
    kwargs = dict(BASE, guidance_scale=1.5)
    expected = diffusers_images(lcm, "lcm", image=control, **kwargs)
    ours = lcm_runners(backend).generate(image=control, scheduler="lcm", seed=0, output_type="np", preprocess=False,
                                         vae=vae, **kwargs)
    check(ours.images, expected, f"{backend} LCM UNet, {vae} VAE")


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_taesd_img2img_matches_torch(lcm_runners, control, photo, backend):
    init = photo.resize((64, 64), PIL.Image.LANCZOS)
    kwargs = dict(BASE, guidance_scale=1.0, strength=0.75, image=control, init_image=init, scheduler="lcm", seed=0,
                  output_type="np", preprocess=False)
    want = lcm_runners("torch").generate(**kwargs).images
    check(lcm_runners(backend).generate(**kwargs).images, want, f"{backend} TAESD img2img")


def test_engine_dir_refuses_a_vae_it_was_not_built_with(engine_dir):
    from engine import Runner

    with pytest.raises(mf.EngineDirError, match="was not built into engine dir.*--vae"):
        Runner(engine_dir=str(engine_dir), backend="onnxruntime", vae="madebyollin/taesd")


def test_tensorrt_profiles_take_batch_1_and_the_few_step_inputs():
    """TensorRT plans are built from the same specs: guidance <= 1 runs every graph at batch 1 (each profile's
    min), an LCM UNet's plan takes timestep_cond, and TAESD gets its own encoder and decoder plans."""
    import dataclasses

    from export.spec import Sizes, build_specs
    from tests.test_trt_logic import SD15

    lcm = dataclasses.replace(SD15, time_cond_proj_dim=256)
    specs = {s.name: s for s in build_specs(lcm, [("canny", False)], "fp16", [("taesd", True)])}
    sizes = Sizes()
    unet = specs["unet"].profile(sizes, 8)
    assert unet["timestep_cond"] == [[1, 256], [2, 256], [8, 256]]
    assert all(shapes[0][0] == 1 for spec in specs.values() for name, shapes in spec.profile(sizes, 8).items()
               if name not in ("timestep", "scales"))
    assert "timestep_cond" not in specs["controlnet_canny"].profile(sizes, 8)
    assert [io.name for io in specs["vae_encoder_taesd"].outputs] == ["latents"]
    assert specs["vae_decoder_taesd"].profile(sizes, 8)["latents"] == [[1, 4, 32, 32], [1, 4, 64, 64], [4, 4, 128, 128]]
