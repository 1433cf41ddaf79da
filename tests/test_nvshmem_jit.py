"""The NVSHMEM build path without a GPU: nvcc -rdc + nvJitLink against libnvshmem_device.a, the
disk cache and its key, the clear errors when a piece is missing, and the transport's checks that
need no GPU."""

import argparse
import multiprocessing
import os
import re
import shutil
import socket
import sys

import pytest
import torch

from conftest import free_port

from lowlat.errors import ArgumentError, ArgumentTypeError, CompileError, TransportError, UnavailableError
from lowlat.jit import nvcc
from lowlat.jit.compiler import included_headers, kernel_dir
from lowlat.jit.spec import ArgKind, KernelSpec, Param
from lowlat.transport import nvshmem_ring
from lowlat.transport.nvshmem_ring import RingLayout, ring_spec

ARCH = "sm_90"
UNAVAILABLE = nvcc.unavailable_reason()
needs_toolchain = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"NVSHMEM toolchain missing: {UNAVAILABLE}")
SMALL = RingLayout(num_ranks=2, message_bytes=1024, num_warps=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWLAT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fresh_toolchain():
    """Forget the memoised toolchain before and after a test that changes what is installed."""
    nvcc._toolchain_cached.cache_clear()
    yield
    nvcc._toolchain_cached.cache_clear()


@pytest.fixture(scope="module")
def small_cubin(tmp_path_factory):
    previous = os.environ.get("LOWLAT_CACHE_DIR")
    os.environ["LOWLAT_CACHE_DIR"] = str(tmp_path_factory.mktemp("shared-cache"))
    try:
        yield nvcc.NvshmemCompiler(ARCH).compile(ring_spec(SMALL))
    finally:
        if previous is None:
            os.environ.pop("LOWLAT_CACHE_DIR", None)
        else:
            os.environ["LOWLAT_CACHE_DIR"] = previous


# -- compile and link ------------------------------------------------------------------------------

@needs_toolchain
def test_compile_and_link_against_the_nvshmem_device_library(small_cubin):
    compiled = small_cubin
    assert isinstance(compiled, nvcc.CompiledCubin) and not compiled.from_cache
    assert compiled.cubin[:4] == b"\x7fELF" and compiled.arch == ARCH
    # One entry point, ours, found by its mangled prefix.
    assert nvcc.entry_symbols(compiled.cubin) == [compiled.mangled_name]
    assert compiled.mangled_name.startswith("_ZN6lowlat12nvshmem_ringI3CfgEEv")
    # Linked: NVSHMEM's device state (what library_init fills) is defined in the cubin.
    assert b"nvshmemi_device_state_d" in compiled.cubin
    assert compiled.module_init is nvcc.nvshmem_module_init
    assert compiled.nvshmem_version == nvcc.toolchain().nvshmem_version


@needs_toolchain
def test_relocatable_object_alone_does_not_link(cache):
    """Without libnvshmem_device.a the NVSHMEM symbols stay undefined: the link step is real."""
    from cuda.core import Linker, LinkerOptions, ObjectCode

    compiler = nvcc.NvshmemCompiler(ARCH, use_disk_cache=False)
    compiler._link = lambda spec, relocatable: relocatable  # keep the unlinked object
    relocatable = compiler._compile_now(ring_spec(SMALL)).cubin
    linker = Linker(ObjectCode.from_cubin(relocatable), options=LinkerOptions(arch=ARCH))
    with pytest.raises(Exception):
        linker.link("cubin")


@needs_toolchain
def test_disk_cache_roundtrip(small_cubin, cache):
    first = nvcc.NvshmemCompiler(ARCH).compile(ring_spec(SMALL))
    assert not first.from_cache
    second = nvcc.NvshmemCompiler(ARCH).compile(ring_spec(SMALL))  # a fresh compiler: only the disk can answer
    assert second.from_cache and second.cubin == first.cubin and second.mangled_name == first.mangled_name
    assert second.module_init is nvcc.nvshmem_module_init
    assert len(list(cache.rglob("*.cubin"))) == 1 and len(list(cache.rglob("*.json"))) == 1
    assert not list(cache.rglob(".*"))  # no temporary files left behind


@needs_toolchain
def test_header_change_invalidates_the_cache_entry(cache, tmp_path, monkeypatch):
    sources = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), sources)
    monkeypatch.setenv("LOWLAT_KERNEL_DIR", str(sources))
    spec = ring_spec(SMALL)
    compiler = nvcc.NvshmemCompiler(ARCH)
    before = compiler.cache_key(spec)
    assert compiler.compile(spec).from_cache is False
    assert nvcc.NvshmemCompiler(ARCH).compile(spec).from_cache is True
    # nvshmem_transport.cuh is included by nvshmem_ring.cuh, not by the generated source.
    with open(sources / "nvshmem_transport.cuh", "a") as handle:
        handle.write("\n// an edit\n")
    after = nvcc.NvshmemCompiler(ARCH).cache_key(spec)
    assert after != before
    assert nvcc.NvshmemCompiler(ARCH).compile(spec).from_cache is False


@needs_toolchain
def test_cache_key_covers_options_arch_and_toolchain(monkeypatch):
    compiler = nvcc.NvshmemCompiler(ARCH)
    spec = ring_spec(SMALL)
    key = compiler.cache_key(spec)
    assert nvcc.NvshmemCompiler("sm_100").cache_key(spec) != key
    assert compiler.cache_key(ring_spec(RingLayout(2, 2048, 2))) != key
    other = nvcc.NvshmemToolchain(**{**compiler.tools.__dict__, "nvshmem_version": "3.8.0"})
    monkeypatch.setattr(compiler, "tools", other)
    assert compiler.cache_key(spec) != key


def test_included_headers_follow_the_nvshmem_kernels():
    names = {p.name for p in included_headers(nvcc.NvshmemCompiler.translation_unit(ring_spec(SMALL)), kernel_dir())}
    assert {"abi.cuh", "nvshmem_ring.cuh", "nvshmem_transport.cuh", "common.cuh", "signal.cuh", "state.cuh"} <= names


@needs_toolchain
def test_abi_mismatch_is_a_compile_error(cache):
    spec = ring_spec(SMALL)
    wrong = list(spec.signature)
    wrong[-1] = Param(wrong[-1].name, ArgKind.I32)  # timeout_ns declared 32-bit
    bad = KernelSpec(spec.header, spec.kernel, tuple(wrong), spec.constants)
    with pytest.raises(CompileError, match="declares the parameters"):
        nvcc.NvshmemCompiler(ARCH, use_disk_cache=False).compile(bad)


def test_nvshmem_flavour_needs_the_put_staging_layout(cache):
    """Puts read staging areas that only the put-staging layout has: a low-latency kernel built in the
    NVSHMEM flavour over the plain layout fails to compile, naming the fix."""
    from lowlat.layout import BufferShape, RegionLayout
    from lowlat.ops import combine
    from lowlat.ops.context import KernelConfig

    shape = BufferShape(num_ranks=2, num_experts=4, num_topk=2, hidden=256, max_tokens_per_rank=4)
    plain = KernelConfig(RegionLayout.of(shape), transport="nvshmem")
    with pytest.raises(CompileError, match=r"put_staging=True"):
        nvcc.NvshmemCompiler(ARCH, use_disk_cache=False).compile(combine.send_spec(plain, use_logfmt=False))


def test_mangled_prefix():
    assert nvcc._mangled_prefix("lowlat::nvshmem_ring") == "_ZN6lowlat12nvshmem_ringI3CfgEEv"
    assert nvcc._mangled_prefix("ring") == "_Z4ringI3CfgEv"
    with pytest.raises(CompileError, match="not a 64-bit ELF"):
        nvcc.entry_symbols(b"not a cubin")


@needs_toolchain
def test_kernel_symbol_names_what_it_found(small_cubin):
    with pytest.raises(CompileError, match=r"lowlat::other_kernel<Cfg>.*found none"):
        nvcc.kernel_symbol(small_cubin.cubin, "lowlat::other_kernel")


def test_bad_arch_is_refused():
    if UNAVAILABLE is not None:
        pytest.skip(f"NVSHMEM toolchain missing: {UNAVAILABLE}")
    with pytest.raises(ValueError, match="arch must look like 'sm_90', got 'hopper'"):
        nvcc.NvshmemCompiler("hopper")


# -- missing pieces: clear errors, no fallback -------------------------------------------------------

def test_missing_nvcc(monkeypatch, fresh_toolchain, tmp_path):
    monkeypatch.delenv("LOWLAT_NVCC", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UnavailableError, match="nvcc not found"):
        nvcc.NvshmemCompiler(ARCH)
    assert "nvcc not found" in nvcc.unavailable_reason()
    monkeypatch.setenv("LOWLAT_NVCC", str(tmp_path / "nvcc"))
    with pytest.raises(UnavailableError, match="LOWLAT_NVCC=.*is not an executable nvcc"):
        nvcc.toolchain()


def test_missing_nvshmem_wheel(monkeypatch, fresh_toolchain, tmp_path):
    import cuda.pathfinder

    monkeypatch.delenv("NVSHMEM_HOME", raising=False)
    monkeypatch.setattr(cuda.pathfinder, "find_nvidia_header_directory", lambda name: None)
    with pytest.raises(UnavailableError, match="NVSHMEM device headers not found: install the nvidia-nvshmem-cu13 wheel"):
        nvcc.find_nvshmem_home()
    monkeypatch.setenv("NVSHMEM_HOME", str(tmp_path))
    with pytest.raises(UnavailableError, match=r"NVSHMEM_HOME=.* has no include/nvshmem.h"):
        nvcc.find_nvshmem_home()
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "nvshmem.h").write_text("")
    with pytest.raises(UnavailableError, match=r"has no lib/libnvshmem_device.a"):
        nvcc.find_nvshmem_home()


def test_missing_nvjitlink(monkeypatch, fresh_toolchain):
    from cuda.bindings import nvjitlink

    def unavailable():
        raise RuntimeError("libnvJitLink.so.13: cannot open shared object file")

    monkeypatch.setattr(nvjitlink, "version", unavailable)
    with pytest.raises(UnavailableError, match="nvJitLink is not available .*libnvJitLink"):
        nvcc.nvjitlink_version()


def test_driver_linker_is_not_accepted(monkeypatch, fresh_toolchain):
    monkeypatch.setattr(nvcc, "_linker_backend", lambda: "driver")
    with pytest.raises(UnavailableError, match="would link with 'driver', not nvJitLink"):
        nvcc.nvjitlink_version()


def test_check_cli_says_plainly_that_it_skipped(monkeypatch, fresh_toolchain, tmp_path, capsys):
    from lowlat.jit.__main__ import _check_nvshmem

    monkeypatch.setenv("LOWLAT_NVCC", str(tmp_path / "no-nvcc"))
    args = argparse.Namespace(require_nvshmem=False, use_cache=False)
    assert _check_nvshmem(ARCH, args) == 0
    out = capsys.readouterr().out
    assert re.search(r"skipped: \d+ NVSHMEM kernel specialisations not compiled: LOWLAT_NVCC=", out)
    args.require_nvshmem = True
    assert _check_nvshmem(ARCH, args) == 1
    assert re.search(r"FAIL: \d+ NVSHMEM kernel specialisations not compiled", capsys.readouterr().out)


def test_missing_nvshmem4py(monkeypatch):
    from lowlat.transport import nvshmem as transport

    monkeypatch.setitem(sys.modules, "nvshmem", None)
    monkeypatch.setitem(sys.modules, "nvshmem.core", None)
    monkeypatch.setitem(sys.modules, "nvshmem.bindings", None)
    with pytest.raises(UnavailableError, match=r"needs nvshmem4py .*pip install 'lowlat\[nvshmem\]'"):
        transport.NvshmemTransport(None, 1024)
    with pytest.raises(UnavailableError, match="needs nvshmem4py"):
        nvcc.nvshmem_module_init(object(), 0)


# -- the transport's checks that need no GPU -------------------------------------------------------

@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error; this machine has a GPU")
def test_buffer_over_nvshmem_on_a_cpu_only_machine(one_rank_group):
    import lowlat

    for kind in ("nvshmem", "auto", "ipc"):
        with pytest.raises(UnavailableError, match=f"transport='{kind}' needs CUDA GPUs and this machine has none"):
            lowlat.Buffer(one_rank_group, transport=kind, max_tokens_per_rank=4, hidden=256, num_experts=4, num_topk=2)


def test_buffer_names_what_the_nvshmem_transport_lacks(one_rank_group, monkeypatch, fresh_toolchain, tmp_path):
    import lowlat

    shape = dict(max_tokens_per_rank=4, hidden=256, num_experts=4, num_topk=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # reach the checks behind the device check
    with pytest.raises(ArgumentError, match="transport must be 'auto', 'ipc' or 'nvshmem', got 'rdma'"):
        lowlat.Buffer(one_rank_group, transport="rdma", **shape)
    with pytest.raises(ArgumentError, match="allow_nvlink=False needs transport='nvshmem'"):
        lowlat.Buffer(one_rank_group, transport="ipc", allow_nvlink=False, **shape)
    with pytest.raises(ArgumentTypeError, match="allow_nvlink"):
        lowlat.Buffer(one_rank_group, transport="nvshmem", allow_nvlink="no", **shape)
    monkeypatch.setenv("LOWLAT_NVCC", str(tmp_path / "no-nvcc"))
    with pytest.raises(UnavailableError, match="LOWLAT_NVCC=.* is not an executable nvcc"):
        lowlat.Buffer(one_rank_group, transport="nvshmem", **shape)
    for name in ("nvshmem", "nvshmem.core", "nvshmem.bindings"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UnavailableError, match="needs nvshmem4py"):
        lowlat.Buffer(one_rank_group, transport="nvshmem", **shape)


def test_put_staging_layout_holds_every_row_a_rank_sends_back():
    from lowlat.layout import BufferShape, RegionLayout

    shape = BufferShape(num_ranks=4, num_experts=36, num_topk=5, hidden=384, max_tokens_per_rank=13)
    plain, staged = RegionLayout.of(shape), RegionLayout.of(shape, put_staging=True)
    assert not plain.put_staging and plain.constants()["kCombineSendRows"] == 0
    assert staged.put_staging and staged.combine_send_rows == 4 * 13 * min(9, 5)
    assert staged.route_staging >= staged.send_buffer + 13 * shape.message_stride
    assert staged.combine_send_staging >= staged.route_staging + 36 * 13 * 4
    end = staged.combine_send_staging + staged.combine_send_rows * shape.combine_slot_stride
    assert end <= staged.total_bytes and staged.combine_send_staging % 128 == 0
    # Everything before the staging is laid out as without it (the same kernels' offsets).
    same = ("parity_base", "parity_bytes", "dispatch_route", "combine_staging", "send_buffer")
    assert all(getattr(plain, name) == getattr(staged, name) for name in same)


def test_transport_argument_checks():
    from lowlat.transport.nvshmem import NvshmemTransport

    with pytest.raises(ArgumentError, match="region_bytes must be a positive int, got 0"):
        NvshmemTransport(None, 0)
    with pytest.raises(ArgumentError, match="region_bytes must be a positive int, got 1.5"):
        NvshmemTransport(None, 1.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error; this machine has a GPU")
def test_transport_on_a_cpu_only_machine():
    pytest.importorskip("nvshmem.core", reason="nvshmem4py not installed (pip install 'lowlat[nvshmem]')")
    from lowlat.transport.nvshmem import NvshmemTransport

    with pytest.raises(UnavailableError, match="needs a CUDA device; this machine has none"):
        NvshmemTransport(None, 1 << 20)


def test_module_init_before_nvshmem_runs():
    pytest.importorskip("nvshmem.core", reason="nvshmem4py not installed (pip install 'lowlat[nvshmem]')")
    from lowlat.transport import nvshmem as transport

    assert transport._runtime.users == 0
    with pytest.raises(UnavailableError, match="NVSHMEM is not running in this process: create the NvshmemTransport"):
        transport.library_init(object(), 0)


def _agree_worker(rank, port, sizes, queue):
    import torch.distributed as dist

    from lowlat.transport.nvshmem import agree_on_region

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(sizes))
    try:
        queue.put((rank, "ok", agree_on_region(dist.group.WORLD, sizes[rank])))
    except ArgumentError as exc:
        queue.put((rank, "error", str(exc)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(4096, 4096), (4096, 8192)], ids=["same", "different"])
def test_region_sizes_must_agree_across_ranks(sizes):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_agree_worker, args=(r, port, sizes, queue)) for r in range(len(sizes))]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    if sizes[0] == sizes[1]:
        assert results == [(0, "ok", True), (1, "ok", True)]
    else:
        for rank, kind, message in results:
            assert kind == "error", (rank, message)
            assert "region_bytes differs across ranks (rank 0: 4096; rank 1: 8192)" in message


# -- the ring's host side ------------------------------------------------------------------------------

def test_ring_layout_areas_do_not_overlap_and_are_aligned():
    layout = RingLayout(num_ranks=4, message_bytes=4096, num_warps=4)
    areas = [(layout.off_send, layout.message_bytes), (layout.off_recv, 2 * layout.message_bytes),
             (layout.off_header, 32), (layout.off_flags, 2 * layout.flag_bytes)]
    for (a, n), (b, _) in zip(areas, areas[1:]):
        assert a + n <= b
    assert all(offset % 128 == 0 for offset, _ in areas)
    assert layout.flag_bytes >= 8 * (layout.num_warps + 1)
    assert layout.region_bytes == layout.off_flags + 2 * layout.flag_bytes
    with pytest.raises(ArgumentError, match="message_bytes must be a positive multiple of 64 .*got 1000"):
        RingLayout(2, 1000, 4)
    with pytest.raises(ArgumentError, match="num_warps must be in"):
        RingLayout(2, 1024, 0)
    with pytest.raises(ArgumentError, match="message_bytes must be at most 262144, got 524288"):
        RingLayout(2, 512 * 1024, 4)
    with pytest.raises(ArgumentError, match="num_ranks must be in"):
        RingLayout(0, 1024, 4)


def test_ring_words_are_distinct_per_source_call_and_index():
    index = torch.arange(nvshmem_ring.MAX_MESSAGE_BYTES // 4)
    words = {(r, e): tuple(nvshmem_ring.ring_word(r, e, index).tolist()) for r in range(8) for e in (1, 2, 3)}
    assert len(set(words.values())) == len(words)
    assert all(len(set(w)) == len(w) for w in words.values())
    assert all(0 <= v < 2**32 for w in words.values() for v in w)
    assert nvshmem_ring.decode_status((1 << 56) | (3 << 32) | 7) == (1, 3, 7)


def test_shipped_nvshmem_specs_are_distinct_and_exist():
    from lowlat.jit.registry import shipped_nvshmem_specs

    specs = shipped_nvshmem_specs()
    assert len(specs) == len(set(specs))
    assert all((kernel_dir() / s.header).is_file() and s.transport == "nvshmem" for s in specs)
    assert all("#define LOWLAT_TRANSPORT_NVSHMEM 1" in s.source() for s in specs)
    # The ring test, then every low-latency kernel family in its NVSHMEM flavour.
    kernels = {s.kernel for s in specs}
    assert {"lowlat::nvshmem_ring", "lowlat::exchange_allgather", "lowlat::dispatch_send", "lowlat::dispatch_recv",
            "lowlat::dispatch", "lowlat::combine_send", "lowlat::combine_recv", "lowlat::combine"} <= kernels


def test_ring_constants_mirror_state_cuh():
    import re

    text = (kernel_dir() / "state.cuh").read_text()
    for name, value in (("kExchangeSeq", nvshmem_ring.EXCHANGE_SEQ), ("kStatusWord", nvshmem_ring.STATUS_WORD),
                        ("kNumStateWords", nvshmem_ring.NUM_STATE_WORDS), ("kStatusTimeout", nvshmem_ring.STATUS_TIMEOUT),
                        ("kStatusOverrun", nvshmem_ring.STATUS_OVERRUN)):
        assert re.search(rf"\b{name}\s*=\s*{value}\b", text), f"{name} is not {value} in state.cuh"


def test_host_identity_tells_machines_apart_by_boot_id():
    from lowlat.transport.base import host_identity

    host, _, boot_id = host_identity().partition("/")
    assert host == socket.gethostname()
    if os.path.exists("/proc/sys/kernel/random/boot_id"):
        assert len(boot_id) == 36


def _start_worker(rank, port, queue):
    """NvshmemTransport._start over a real gloo group with NVSHMEM's init replaced by a recorder:
    the unique id rank 0 creates must reach rank 1 byte for byte."""
    import ctypes

    import cuda.core
    import nvshmem.core as real
    import torch.distributed as dist

    from lowlat.transport import nvshmem as transport

    class FakeDevice:
        def __init__(self, index):
            self.device_id = index

        def set_current(self):
            pass

    class FakeCore:
        inits, finalized = [], 0
        get_unique_id = staticmethod(real.get_unique_id)

        @classmethod
        def init(cls, device, uid, rank, nranks, initializer_method):
            cls.inits.append((device.device_id, ctypes.string_at(uid.ptr, 128), rank, nranks, initializer_method))

        @classmethod
        def finalize(cls):
            cls.finalized += 1

    cuda.core.Device = FakeDevice  # no GPU here: _start only needs set_current()
    for name in ("NVSHMEM_DISABLE_NVLS", "NVSHMEM_REMOTE_TRANSPORT", "NVSHMEM_SYMMETRIC_SIZE"):
        os.environ.pop(name, None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    singles = [dist.new_group([0]), dist.new_group([1])]

    def bare(group, group_rank, size):
        t = transport.NvshmemTransport.__new__(transport.NvshmemTransport)
        t.group, t.rank, t.num_ranks, t._device = group, group_rank, size, torch.device("cuda", 0)
        return t

    first = bare(dist.group.WORLD, rank, 2)
    first._start(FakeCore, dist, 3 << 30, one_host=True)
    env = {k: os.environ.get(k) for k in ("NVSHMEM_DISABLE_NVLS", "NVSHMEM_REMOTE_TRANSPORT", "NVSHMEM_SYMMETRIC_SIZE")}
    bare(dist.group.WORLD, rank, 2)._start(FakeCore, dist, 3 << 30, one_host=True)  # a second transport, same ranks
    users = transport._runtime.users
    try:
        bare(singles[rank], 0, 1)._start(FakeCore, dist, 1 << 20, one_host=True)
        other_group_error = None
    except TransportError as exc:
        other_group_error = str(exc)
    first._release_runtime(FakeCore)
    finalized_after_one = FakeCore.finalized
    first._release_runtime(FakeCore)
    queue.put((rank, FakeCore.inits, env, users, other_group_error, finalized_after_one, FakeCore.finalized))
    dist.destroy_process_group()


def test_unique_id_reaches_every_rank_and_the_runtime_is_shared():
    pytest.importorskip("nvshmem.core", reason="nvshmem4py not installed (pip install 'lowlat[nvshmem]')")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_start_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    uids = set()
    for rank, inits, env, users, other_group_error, finalized_after_one, finalized in results:
        assert len(inits) == 1, f"rank {rank}: NVSHMEM started {len(inits)} times"
        device, uid, pe, num_pes, method = inits[0]
        assert (device, pe, num_pes, method) == (0, rank, 2, "uid")
        uids.add(uid)
        heap = -(-((3 << 30) + (64 << 20)) // (2 << 20)) * (2 << 20)
        assert env == {"NVSHMEM_DISABLE_NVLS": "1", "NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_SYMMETRIC_SIZE": str(heap)}
        assert users == 2
        assert other_group_error and "a second NvshmemTransport must use the same group and device" in other_group_error
        assert (finalized_after_one, finalized) == (0, 1)
    assert len(uids) == 1 and uids.pop() != bytes(128)
