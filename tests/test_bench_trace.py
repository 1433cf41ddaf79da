"""The phase tracer's reading of the kernels' trace lines (kernels/trace.cuh), on the CPU."""

import os
import sys

import pytest

from lowlat.bench import trace

LINES = """unrelated output
lowlat-trace dispatch block 0: 100 300 400 900 1000 1500 0
lowlat-trace dispatch block 17 last: 120 320 600 610 700 1200 0
lowlat-trace dispatch block 0: 200 500 600 1000 1100 1700 0
lowlat-trace combine block 0 last: 50 450 500 700 1600 0 0
"""


def test_lines_are_grouped_by_kernel_and_block_and_cut_to_the_kernels_points():
    timelines = trace.parse(LINES)
    assert timelines == {
        ("dispatch", "block 0"): [[100, 300, 400, 900, 1000, 1500], [200, 500, 600, 1000, 1100, 1700]],
        ("dispatch", "last block"): [[120, 320, 600, 610, 700, 1200]],
        ("combine", "last block"): [[50, 450, 500, 700, 1600]],  # block 0 and the last one: counted as the last
    }


def test_phases_are_median_steps_between_points_in_cycles_and_microseconds():
    rows = trace.summarize(trace.parse(LINES), clock_mhz=100.0)
    block0 = [r for r in rows if r["kernel"] == "dispatch" and r["block"] == "block 0"]
    assert [r["phase"] for r in block0] == list(trace.PHASES["dispatch"])
    # Steps of the two calls: (100, 200, 100, 500, 100, 500) and (200, 300, 100, 400, 100, 600); medians:
    assert [r["cycles"] for r in block0] == [150, 250, 100, 450, 100, 550]
    assert [r["cumulative_cycles"] for r in block0] == [150, 400, 500, 950, 1050, 1600]
    assert block0[1]["us"] == pytest.approx(2.5) and block0[-1]["cumulative_us"] == pytest.approx(16.0)
    assert all(r["calls"] == 2 for r in block0)


def test_device_output_is_read_from_file_descriptor_1():
    text = trace._capture_stdout(lambda: os.write(1, b"lowlat-trace combine block 3 last: 1 2 3 4 5 0 0\n"))
    assert trace.parse(text) == {("combine", "last block"): [[1, 2, 3, 4, 5]]}
    assert sys.stdout.write("") == 0  # standard output works again afterwards


def test_without_a_gpu_it_says_so(capsys, monkeypatch):
    monkeypatch.setattr(trace.torch.cuda, "is_available", lambda: False)
    assert trace.run([]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().out


def test_every_blocks_span_line_gives_the_kernel_span_and_the_block_finishing_last():
    call = """lowlat-trace dispatch block 0: 10 20 30 40 50 60 0 @ 1000 6000
lowlat-trace dispatch block 5: 11 21 31 41 51 61 0 @ 900 7500
lowlat-trace dispatch block 9 last: 12 22 32 42 52 62 0 @ 1100 5000
lowlat-trace combine block 0 last: 1 2 3 4 5 0 0 @ 2000 2600
lowlat-trace combine block 1: 1 2 3 4 6 0 0 @ 2100 2500
"""
    assert trace.finishing(call) == {
        "dispatch": dict(span_ns=6600, block=5, who="another block", points=[11, 21, 31, 41, 51, 61]),
        "combine": dict(span_ns=600, block=0, who="last block", points=[1, 2, 3, 4, 5]),
    }
    # The phase groups keep block 0 and the flag raiser only; the lines without a span still parse.
    assert trace.parse(call) == {("dispatch", "block 0"): [[10, 20, 30, 40, 50, 60]],
                                 ("dispatch", "last block"): [[12, 22, 32, 42, 52, 62]],
                                 ("combine", "last block"): [[1, 2, 3, 4, 5]]}
    assert trace.finishing(LINES) == {}
