"""The DeepEP normal-mode side-by-side harness (lowlat/bench/versus_normal.py) without DeepEP and
without a GPU: its session drives lowlat's DeepEP facade on virtual CPU ranks exactly as it drives
DeepEP, and the rows and sums it produces are checked bit for bit against lowlat.reference.  What
this cannot check (DeepEP itself, the timings) needs several GPUs."""

import pytest
import torch

from lowlat import reference
from lowlat.bench import versus_normal
from lowlat.compat import deep_ep
from lowlat.normal import NormalBuffer
from lowlat.transport.local import LocalWorld


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_session_drives_deepeps_normal_api(fp8):
    from normal_helpers import check_combine, check_dispatch, make_inputs, reference_dispatch, run_ranks

    R, n, hidden, experts, topk = 2, 12, 256, 8, 3
    nvl = NormalBuffer.region_bytes(num_ranks=R, hidden=hidden, num_experts=experts, max_tokens_per_rank=64, max_topk=topk)
    world = LocalWorld(R, nvl, "cpu")
    buffers = [deep_ep.Buffer(world.transport(r), nvl, 0, low_latency_mode=False, timeout_s=20.0) for r in range(R)]
    inputs = make_inputs(R, n, hidden, experts, topk, seed=5)
    sessions = [versus_normal.NormalSession(b, i.x, i.x_fp8, i.x_scales, i.topk_idx, i.topk_weights, experts, fp8=fp8)
                for b, i in zip(buffers, inputs)]

    results = run_ranks(buffers, lambda r, b: sessions[r].dispatch())
    refs = reference_dispatch(inputs, experts, fp8=fp8)
    check_dispatch(results, refs, fp8=fp8)
    ys = [s.make_expert_output() for s in sessions]
    for s, ref in zip(sessions, refs):
        rows = ref.recv_x.shape[0]
        row = hidden + 4 * (hidden // 128) if fp8 else 2 * hidden
        assert s.received_bytes() == {"dispatch": rows * row, "combine": rows * 2 * hidden, "rows": rows}
    outs = run_ranks(buffers, lambda r, b: sessions[r].combine())
    want = reference.reference_normal_combine(ys, refs, [i.num_tokens for i in inputs],
                                              topk_weights=[s.recv_topk_weights for s in sessions])
    check_combine(outs, want)


def test_table_reports_ratios_and_deepep_gbps():
    record = {"num_ranks": 8, "num_tokens": 4096, "hidden": 7168, "topk": 8, "experts": 256, "dispatch_format": "fp8",
              "us": {"lowlat": {"dispatch": 400.0, "combine": 800.0}, "deepep": {"dispatch": 500.0, "combine": 600.0}},
              "bytes_per_rank": {"dispatch": 4e7, "combine": 6e7}}
    text = versus_normal.table(record)
    assert " 1.25x " in text and " 0.75x " in text  # DeepEP / lowlat
    assert "100.0" in text and "80.0" in text  # 4e7 bytes in 400 us and 500 us, GB/s


def test_without_two_gpus_it_says_so(capsys):
    if torch.cuda.device_count() >= 2:
        pytest.skip("checks the refusal on machines with fewer than two GPUs; this one has more")
    assert versus_normal.run(None) == 2
    assert "one rank per GPU" in capsys.readouterr().out
