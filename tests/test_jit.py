"""The run-time compiler without a GPU: NVRTC compiles for sm_90, the disk cache, header tracking,
the ABI check between Python launchers and C++ kernels, and argument conversion."""

import ctypes
import multiprocessing
import shutil
import time

import numpy as np
import pytest
import torch

from lowlat.errors import ArgumentError, ArgumentTypeError, CompileError
from lowlat.jit import ArgKind, Compiler, Kernel, KernelSpec, Param
from lowlat.jit.compiler import included_headers, kernel_dir
from lowlat.jit.registry import SHIPPED_SHAPES, shipped_specs
from lowlat.layout import BufferShape, RegionLayout
from lowlat.ops import exchange
from lowlat.jit.launch import LaunchPlan
from lowlat.ops.context import _RANK_ARGS, KernelConfig, unpack_rank_args

_RANK_ARGS_PACK = _RANK_ARGS.pack

ARCH = "sm_90"


def small_spec(**overrides) -> KernelSpec:
    config = KernelConfig(RegionLayout.of(BufferShape(2, 4, 2, 128, 3)))
    spec = exchange.exchange_spec(config)
    return KernelSpec(spec.header, spec.kernel, overrides.get("signature", spec.signature), spec.constants)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWLAT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_compile_without_gpu_and_disk_cache_roundtrip(cache):
    first = Compiler(ARCH).compile(small_spec())
    assert not first.from_cache and first.cubin[:4] == b"\x7fELF" and first.mangled_name.startswith("_Z")
    second = Compiler(ARCH).compile(small_spec())  # a fresh compiler: only the disk cache can answer
    assert second.from_cache and second.cubin == first.cubin and second.mangled_name == first.mangled_name
    assert len(list(cache.rglob("*.cubin"))) == 1 and len(list(cache.rglob("*.json"))) == 1


def test_header_change_invalidates_the_cache_entry(cache, tmp_path, monkeypatch):
    sources = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), sources)
    monkeypatch.setenv("LOWLAT_KERNEL_DIR", str(sources))
    spec = small_spec()
    before = Compiler(ARCH).cache_key(spec)
    assert Compiler(ARCH).compile(spec).from_cache is False
    assert Compiler(ARCH).compile(spec).from_cache is True
    # common.cuh is included indirectly (exchange.cuh -> signal.cuh -> common.cuh).
    with open(sources / "common.cuh", "a") as handle:
        handle.write("\n// an edit\n")
    after = Compiler(ARCH).cache_key(spec)
    assert after != before
    assert Compiler(ARCH).compile(spec).from_cache is False


def test_included_headers_follow_includes_recursively():
    names = {p.name for p in included_headers(small_spec().source(), kernel_dir())}
    assert {"abi.cuh", "exchange.cuh", "signal.cuh", "common.cuh", "state.cuh", "transport.cuh", "rank.cuh"} <= names


def test_abi_mismatch_between_launcher_and_kernel_is_a_compile_error(cache):
    spec = small_spec()
    wrong = list(spec.signature)
    wrong[-1] = wrong[-1].__class__(wrong[-1].name, ArgKind.PTR)  # the RankArgs struct declared as a pointer
    with pytest.raises(CompileError, match="declares the parameters"):
        Compiler(ARCH, use_disk_cache=False).compile(small_spec(signature=tuple(wrong)))


def _compile_in_child(arch, start, broken=False):
    start.wait(timeout=120)  # both processes miss the cache together
    spec = small_spec()
    if broken:  # the launcher declares a parameter the kernel does not have: a compile error
        spec = small_spec(signature=spec.signature[:-1] + (Param("rank", ArgKind.I32),))
    try:
        compiled = Compiler(arch).compile(spec)
    except CompileError as exc:
        return "CompileError", str(exc)
    return compiled.from_cache, compiled.cubin


def _in_two_processes(*args):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            return pool.starmap(_compile_in_child, [(ARCH, start, *args)] * 2)


def test_concurrent_processes_compile_once_and_share_the_cache(cache):
    """Ranks of one node build the same kernels at the same moment: one process compiles each entry
    (under the entry's lock), the others wait and read it."""
    results = _in_two_processes()
    assert sorted(from_cache for from_cache, _ in results) == [False, True]
    assert results[0][1] == results[1][1] and results[0][1][:4] == b"\x7fELF"
    cached = Compiler(ARCH).compile(small_spec())
    assert cached.from_cache and cached.cubin == results[0][1]
    assert len(list(cache.rglob("*.cubin"))) == 1
    assert not list(cache.rglob(".*"))  # no temporary files left behind


def test_a_compile_error_reaches_every_waiting_process(cache):
    """A kernel that does not compile fails in every process that asked for it, and the processes
    that waited on the lock read the error instead of compiling again in turn."""
    results = _in_two_processes(True)
    assert [kind for kind, _ in results] == ["CompileError"] * 2
    assert all("declares the parameters" in message for _, message in results)


def test_recorded_failures_are_honoured_only_when_fresh(cache):
    from lowlat.jit.compiler import disk_failure, record_failure

    spec = small_spec()
    record_failure(spec, ARCH, "k" * 64, "boom")
    assert disk_failure(spec, ARCH, "k" * 64, since=time.time() - 60) == "boom"  # while this process waited
    assert disk_failure(spec, ARCH, "k" * 64, since=time.time() + 60) is None  # from an earlier run: retried
    assert disk_failure(spec, ARCH, "x" * 64, since=0.0) is None


def _send_spec():
    from lowlat.ops import dispatch
    return dispatch.send_spec(KernelConfig(RegionLayout.of(BufferShape(2, 4, 2, 128, 3))), use_fp8=True, topk_int64=True)


RANK = _RANK_ARGS_PACK(0x1000, 0x2000, 0x3000, 0x4000, 5_000_000_000, 1, 0)


def test_argument_conversion_is_typed_and_checked(cache):
    kernel = Kernel(Compiler(ARCH).compile(_send_spec()))  # x, topk_idx, num_tokens_ptr, num_tokens_host, round_scale, rank
    x = torch.zeros(4, dtype=torch.bfloat16, device="cpu")
    args = kernel.convert_args((x, None, 0x10, 7, True, RANK))
    assert args[0] == x.data_ptr() and args[1] == 0 and args[2] == 0x10
    assert isinstance(args[3], np.int32) and args[4] == 1 and bytes(args[5]) == RANK
    with pytest.raises(ArgumentError, match="takes 6 arguments"):
        kernel.convert_args((x,))
    with pytest.raises(ArgumentError, match="num_tokens_host=4294967296 does not fit int32"):
        kernel.convert_args((x, None, None, 2**32, False, RANK))
    with pytest.raises(ArgumentTypeError, match="num_tokens_host: expected an integer"):
        kernel.convert_args((x, None, None, 1.5, False, RANK))
    with pytest.raises(ArgumentTypeError, match="x: expected a tensor"):
        kernel.convert_args(("x", None, None, 1, False, RANK))
    with pytest.raises(ArgumentError, match="rank: expected 48 packed bytes"):
        kernel.convert_args((x, None, None, 1, False, RANK[:40]))


def test_launch_plan_packs_every_argument_and_patches_the_variable_ones(cache):
    """A plan's host memory is what cuLaunchKernel reads: one pointer per parameter, each pointing at
    the argument's bytes; per-call values land in their slots (checked here without a GPU)."""
    kernel = Kernel(Compiler(ARCH).compile(_send_spec()))
    x = torch.zeros(4, dtype=torch.bfloat16, device="cpu")
    plan = LaunchPlan(kernel, None, 0, 132, 512, 0, kernel.convert_args((None, None, None, 0, False, RANK)),
                      variable=[0, 3, 4])
    assert [plan.argument(n) for n in ("x", "topk_idx", "num_tokens_host", "round_scale")] == [0, 0, 0, 0]
    assert unpack_rank_args(plan.argument("rank")) == dict(peer_bases=0x1000, state=0x2000, mask=0x3000, status=0x4000,
                                                           timeout_ns=5_000_000_000, id=1, reserved=0)
    for offset, value in zip(plan._variable, (x.data_ptr(), 128, 1)):  # what launch_on() writes before cuLaunchKernel
        plan._words[offset] = value
    assert plan.argument("x") == x.data_ptr() and plan.argument("num_tokens_host") == 128 and plan.argument("round_scale") == 1
    pointers = np.frombuffer(ctypes.string_at(plan._params, 8 * 6), dtype=np.uint64)
    base = ctypes.addressof(plan._words)
    assert [int(p) - base for p in pointers] == [0, 8, 16, 24, 32, 40]  # one word each, RankArgs last
    assert ctypes.c_int32.from_address(int(pointers[3])).value == 128
    assert ctypes.string_at(int(pointers[5]), 48) == RANK
    with pytest.raises(ArgumentError, match="takes 3 per-call arguments"):
        plan.launch_on(0, x)


def test_launch_plan_with_pdl_keeps_a_launch_config_and_can_drop_it(cache):
    """Programmatic dependent launch goes through cuLaunchKernelEx with a config built once per plan
    (grid, block, shared memory, the PDL attribute); a call sets only the stream (and a grid)."""
    from cuda.bindings import driver

    kernel = Kernel(Compiler(ARCH).compile(_send_spec()))
    plan = LaunchPlan(kernel, None, 0, 132, 512, 0, kernel.convert_args((None, None, None, 0, False, RANK)), variable=[0], pdl=True)
    config = plan._config
    assert plan.pdl and (config.gridDimX, config.blockDimX, config.sharedMemBytes, config.numAttrs) == (132, 512, 0, 1)
    attribute = config.attrs[0]
    assert attribute.id == driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    assert attribute.value.programmaticStreamSerializationAllowed == 1
    launched = []
    plan._launch_ex = lambda config, *args: launched.append((config.gridDimX, config.gridDimY, int(config.hStream))) or (0,)
    plan.launch_on(7, 0, grid=66)  # a per-launch grid, then the planned one again
    plan.launch_on(8, 0)
    plan.launch_on(9, 0)
    assert launched == [(66, 1, 7), (132, 1, 8), (132, 1, 9)]
    plan.use_pdl(False)
    assert not plan.pdl and plan._config is None


def test_kernel_config_scopes():
    """GPU-scope flags exist only in the pointer flavour; the constant reaches every kernel's Cfg."""
    layout = RegionLayout.of(BufferShape(2, 4, 2, 128, 3))
    assert dict(KernelConfig(layout, peers_on_device=True).spec("exchange.cuh", "lowlat::exchange_allgather", ()).constants)[
        "kPeersOnDevice"] is True
    with pytest.raises(ValueError, match="peers_on_device=True needs the peer transport flavour, got transport='nvshmem'"):
        KernelConfig(RegionLayout.of(BufferShape(2, 4, 2, 128, 3), put_staging=True), transport="nvshmem", peers_on_device=True)


def test_traced_fused_kernels_compile(cache):
    """kernels/trace.cuh stays buildable: the fused kernels with their phase marks (LOWLAT_TRACE=1)."""
    from lowlat.ops import combine, dispatch

    config = KernelConfig(RegionLayout.of(BufferShape(2, 4, 2, 128, 3)), trace=True)
    for spec in (dispatch.fused_spec(config, use_fp8=True, use_ue8m0=False, topk_int64=True),
                 combine.fused_spec(config, use_logfmt=True, topk_int64=False)):
        assert dict(spec.constants)["kTrace"] is True
        assert Compiler(ARCH).compile(spec).cubin


def test_every_shipped_kernel_family_is_in_the_registry():
    specs = shipped_specs(SHIPPED_SHAPES[:1], normal_shapes=())
    kernels = {s.kernel for s in specs}
    assert kernels == {"lowlat::exchange_allgather", "lowlat::dispatch_send", "lowlat::dispatch_recv", "lowlat::dispatch",
                       "lowlat::combine_send", "lowlat::combine_recv", "lowlat::combine"}
    # exchange 1; dispatch: 4 sends, 3 receives, 6 fused; combine: 2 sends, 4 receives, 4 fused; each with
    # system-scope flags (ranks on several GPUs) and GPU-scope flags (the same ranks as virtual ranks)
    assert len(specs) == len(set(specs)) == 2 * 24
    assert sorted(dict(s.constants)["kPeersOnDevice"] for s in specs) == [False] * 24 + [True] * 24


def test_generated_source_declares_cfg_and_the_abi_check():
    source = small_spec().source()
    assert "struct Cfg {" in source and "static constexpr int kNumRanks = 2;" in source
    assert 'lowlat::abi::matches<decltype(&lowlat::exchange_allgather<Cfg>)>("ppR")' in source


def test_check_cli_without_arguments_prints_usage(capsys):
    from lowlat.jit.__main__ import main
    assert main([]) == 2
    assert "--check" in capsys.readouterr().out
