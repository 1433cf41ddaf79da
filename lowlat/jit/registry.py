"""The kernel specialisations lowlat ships, in one place.

Kernels are specialised for each Buffer's shapes at run time, so there is no whitelist; this list
names the shapes ``python -m lowlat.jit --check`` compiles to prove every kernel family builds:
DeepSeek-V3 decode (the standard benchmark shape), a single rank, and awkward shapes (a hidden size
that is not a multiple of 256, an odd top-k, many experts).  NVSHMEM kernels (nvcc + nvJitLink,
``lowlat/jit/nvcc.py``) are listed apart, in :func:`shipped_nvshmem_specs`.
"""

from __future__ import annotations

from ..layout import BufferShape, RegionLayout
from ..normal.layout import NormalLayout, NormalShape
from .spec import KernelSpec

SHIPPED_SHAPES = (
    BufferShape(num_ranks=8, num_experts=256, num_topk=8, hidden=7168, max_tokens_per_rank=128),  # standard
    BufferShape(num_ranks=1, num_experts=256, num_topk=8, hidden=7168, max_tokens_per_rank=128),
    BufferShape(num_ranks=2, num_experts=1024, num_topk=16, hidden=4096, max_tokens_per_rank=64),
    BufferShape(num_ranks=4, num_experts=36, num_topk=5, hidden=384, max_tokens_per_rank=13),
)


# Normal (prefill) mode: the benchmark shape (DeepSeek-V3 prefill, 4096 tokens per rank), one rank,
# and an awkward one (3 ranks, hidden 384, top-5 of 36 experts).
NORMAL_SHAPES = (
    NormalShape(num_ranks=8, num_experts=256, hidden=7168, max_tokens_per_rank=4096, max_topk=8),
    NormalShape(num_ranks=1, num_experts=256, hidden=7168, max_tokens_per_rank=4096, max_topk=8),
    NormalShape(num_ranks=3, num_experts=36, hidden=384, max_tokens_per_rank=13, max_topk=5),
)


def normal_specs(shapes=NORMAL_SHAPES) -> list[KernelSpec]:
    from ..normal.ops import NormalKernels

    return [spec for shape in shapes for spec in NormalKernels(NormalLayout.of(shape)).all()]


def shipped_specs(shapes=SHIPPED_SHAPES, normal_shapes=NORMAL_SHAPES) -> list[KernelSpec]:
    """The pointer flavour at every shipped shape (across GPUs, or on one when the shape has one
    rank), the standard shape also as virtual ranks on one GPU, and the normal kernels."""
    virtual = [spec for shape in shapes[:1] if shape.num_ranks > 1 for spec in low_latency_specs(shape, peers_on_device=True)]
    return [spec for shape in shapes for spec in low_latency_specs(shape)] + virtual + normal_specs(normal_shapes)


# The NVSHMEM transport's smoke test (kernels/nvshmem_ring.cuh): (ranks, message bytes, warps).
SHIPPED_RING_SHAPES = ((2, 64 * 1024, 4), (8, 4096, 8))


# The low-latency kernels over the nvshmem transport: the standard shape and the awkward one.
SHIPPED_NVSHMEM_SHAPES = (SHIPPED_SHAPES[0], SHIPPED_SHAPES[3])


def low_latency_specs(shape: BufferShape, transport: str = "peer", *, peers_on_device: bool | None = None) -> list[KernelSpec]:
    """Every kernel a low-latency Buffer of ``shape`` loads, for a transport flavour; GPU-scope flags
    (``peers_on_device``) default to what a Buffer picks for a group of that size across GPUs."""
    from ..ops import low_latency_specs as specs_of
    from ..ops.context import KernelConfig

    if peers_on_device is None:
        peers_on_device = transport == "peer" and shape.num_ranks == 1
    layout = RegionLayout.of(shape, put_staging=transport == "nvshmem")
    return specs_of(KernelConfig(layout, transport=transport, peers_on_device=peers_on_device))


def shipped_nvshmem_specs(shapes=SHIPPED_RING_SHAPES, low_latency_shapes=SHIPPED_NVSHMEM_SHAPES) -> list[KernelSpec]:
    """Specialisations of the kernels that call NVSHMEM's device API (compiled by NvshmemCompiler):
    the transport's ring test and the low-latency kernels in their NVSHMEM flavour."""
    from ..transport.nvshmem_ring import RingLayout, ring_spec

    ring = [ring_spec(RingLayout(num_ranks, message_bytes, num_warps)) for num_ranks, message_bytes, num_warps in shapes]
    return ring + [spec for shape in low_latency_shapes for spec in low_latency_specs(shape, "nvshmem")]
