import os
import sys

# Virtual ranks on concurrent streams must not share a hardware queue (see lowlat/transport/local.py);
# set before CUDA starts in this process.
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

HAS_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU: this machine has no CUDA device (runs on the GPU machines via bench/gpu_check.sh)")


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a gloo rendezvous between test processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nvshmem_skip_reason():
    """Why the NVSHMEM GPU tests cannot run here (no GPU, no nvshmem4py, no nvcc / NVSHMEM device
    library / nvJitLink), or None when they can."""
    if not HAS_GPU:
        return "needs an NVIDIA GPU: this machine has no CUDA device"
    try:
        import nvshmem.core  # noqa: F401
    except ImportError as exc:
        return f"needs nvshmem4py ({exc}): pip install 'lowlat[nvshmem]' (nvshmem4py-cu13)"
    from lowlat.jit import nvcc

    return nvcc.unavailable_reason()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped, with that reason, where there is none)")
