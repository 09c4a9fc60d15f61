"""Install entry for the ControlNet engine.

`pip install -e .[test]` installs the three top-level packages `engine`, `export` and `kernels`.
Pinned versions live in requirements/constraints.txt (pass it with `-c`).
"""
from setuptools import find_packages, setup

RUNTIME = [
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "numpy",
    "pillow",
    "opencv-python-headless",
]

EXTRAS = {
    "onnx": ["onnx", "onnxruntime", "onnxscript"],
    "kernels": ["triton"],
    # onnxruntime-gpu installs the same module as onnxruntime: never both in one environment.
    "tensorrt": ["onnx", "onnxscript", "onnxruntime-gpu", "tensorrt"],
    "test": ["pytest", "pytest-benchmark", "onnx", "onnxruntime", "onnxscript", "triton"],
}

setup(
    name="controlnet-engine",
    version="0.1.0",
    description="Stable Diffusion 1.5 + ControlNet inference: PyTorch reference, ONNX Runtime, TensorRT",
    packages=find_packages(include=["engine", "engine.*", "export", "export.*", "kernels", "kernels.*"]),
    package_data={"engine": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require=EXTRAS,
)
