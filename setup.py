"""lowlat: CUDA-graph-first low-latency expert-parallel dispatch/combine kernels.

Pure-Python install: the CUDA C++ in ``kernels/`` ships as package data (``lowlat._kernels``) and is
compiled with NVRTC at run time, so nothing is compiled here.
"""

from setuptools import setup

setup(
    name="lowlat",
    version="0.1.0",
    description="CUDA-graph-first low-latency MoE expert-parallel dispatch/combine kernels",
    python_requires=">=3.10",
    packages=[
        "lowlat",
        "lowlat.jit",
        "lowlat.ops",
        "lowlat.engines",
        "lowlat.transport",
        "lowlat.compat",
        "lowlat.bench",
        "lowlat.graphs",
        "lowlat._kernels",
    ],
    package_dir={"lowlat.graphs": "graphs", "lowlat._kernels": "kernels"},
    package_data={"lowlat._kernels": ["*.cuh"]},  # includes the NVSHMEM headers (nvshmem_*.cuh)
    install_requires=[
        "torch>=2.4",
        "numpy",
        "cuda-core>=1.2,<2",
        "cuda-bindings>=13.0,<14",
        "cuda-pathfinder>=1.2",
        # NVRTC and the headers it needs (cuda_bf16.h / cuda_fp8.h from the runtime, CCCL for cuda/std).
        "nvidia-cuda-nvrtc>=13.0,<14",
        "nvidia-cuda-runtime>=13.0,<14",
        "nvidia-cuda-cccl>=13.0,<14",
    ],
    extras_require={
        "test": ["pytest>=7"],
        "bench": ["matplotlib"],
        # The NVSHMEM transport: nvshmem4py (host API), NVSHMEM's device headers and static device
        # library (kernels that call NVSHMEM are compiled with nvcc, which must be installed
        # separately, and linked with nvJitLink).  PyTorch's CUDA 13 wheels already bring
        # nvidia-nvshmem-cu13 3.4.5; .ci/constraints.txt holds the verified versions.
        "nvshmem": ["nvshmem4py-cu13>=0.4", "nvidia-nvshmem-cu13>=3.4,<4", "nvidia-nvjitlink>=13.0,<14"],
    },
    entry_points={"console_scripts": ["lowlat-bench=lowlat.bench.__main__:main", "lowlat-jit=lowlat.jit.__main__:main"]},
)
