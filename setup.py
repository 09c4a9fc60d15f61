"""Install entry for the ControlNet engine.

`pip install -e .[test]` installs the three top-level packages `engine`, `export` and `kernels`.
Pinned versions live in requirements/constraints.txt (pass it with `-c`).
"""
import importlib.util
import os
from pathlib import Path

from setuptools import Distribution, find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


class BuildPyWithNative(build_py):
    """Also build kernels' optional native modules with CMake (kernels/build_native.py).

    Any failure (no cmake, compiler or pybind11) is printed and the install goes on: kernels then uses
    Triton or torch. ENGINE_SKIP_NATIVE=1 skips the attempt.
    """

    def run(self):
        super().run()
        if os.environ.get("ENGINE_SKIP_NATIVE", "0") not in ("", "0"):
            return
        editable = getattr(self, "editable_mode", False)
        out_dir = HERE / "kernels" if editable else Path(self.build_lib) / "kernels"
        spec = importlib.util.spec_from_file_location("_build_native", HERE / "kernels" / "build_native.py")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)  # standard library only: no torch needed at build time
            for path in module.build(output_dir=out_dir, build_dir=HERE / "build" / "native"):
                print(f"built {path}")
        except Exception as exc:  # optional: never fail the install over it
            print(f"WARNING: native kernels not built ({exc}); kernels falls back to Triton/torch")


class MaybeBinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True  # the wheel may carry the compiled modules: tag it for this platform


RUNTIME = [
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "numpy",
    "pillow",
    "opencv-python-headless",
    "tqdm",  # engine.generate's progress bar
    "peft",  # LoRA (engine/lora.py): diffusers' LoRA loading needs it, and the merge runs its layers
    "scipy",  # transformers' OneFormer builds its loss's matcher with it, also for inference (seg_ofade20k)
]

EXTRAS = {
    "onnx": ["onnx", "onnxruntime", "onnxscript", "onnxslim"],
    # python -m engine.build --backend openvino and Runner(backend="openvino"): no ONNX Runtime needed.
    "openvino": ["onnx", "onnxslim", "openvino"],
    "kernels": ["triton", "pybind11"],
    # onnxruntime-gpu installs the same module as onnxruntime: never both in one environment.
    "tensorrt": ["onnx", "onnxscript", "onnxslim", "onnxruntime-gpu", "tensorrt"],
    "serve": ["ray[serve]", "fastapi", "gradio", "python-multipart", "httpx"],
    "bench": ["pytest-benchmark", "matplotlib"],
    # benchmarks/bench_openvino_int8.py: NNCF's post-training int8 of the OpenVINO graphs (not in "test": its
    # quantization of even the tiny UNet takes a minute, and the benchmark skips without it)
    "int8": ["nncf", "openvino"],
    # The preprocessors only controlnet_aux has (softedge, scribble, lineart, mlsd, normal_bae, openpose_full, ...):
    # it needs torchvision, which must match torch (requirements/constraints-aux.txt; README "Preprocessors").
    "aux": ["controlnet-aux", "torchvision", "timm", "scikit-image"],
    "test": ["pytest", "pytest-benchmark", "pytest-xdist", "onnx", "onnxruntime", "onnxscript", "onnxslim", "openvino", "triton", "pybind11",
             "ray[serve]", "fastapi", "gradio", "python-multipart", "httpx", "webuiapi", "schemathesis"],
}

setup(
    name="controlnet-engine",
    version="0.1.0",
    description="Stable Diffusion 1.5 + ControlNet inference: PyTorch reference, ONNX Runtime, OpenVINO, TensorRT",
    packages=find_packages(include=["engine", "engine.*", "export", "export.*", "kernels", "kernels.*"]),
    package_data={"engine": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require=EXTRAS,
    cmdclass={"build_py": BuildPyWithNative},
    distclass=MaybeBinaryDistribution,
)
