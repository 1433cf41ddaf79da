"""Benchmark output: the printed table, the JSON record (machine, versions, shapes, every figure) and
the latency-versus-tokens plot."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch


def environment() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sms=props.multi_processor_count, devices=torch.cuda.device_count(),
                    memory_gib=round(props.total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        info["device"] = "cpu (no CUDA device)"
    return info


def table(points: list[dict], transport: str) -> str:
    head = (f"{'ranks':>5} {'tokens':>6} | {'dispatch us':>11} {'torch us':>9} {'x torch':>7} {'floor us':>8} {'x floor':>7} "
            f"{'GB/s':>6} | {'combine us':>10} {'torch us':>9} {'x torch':>7} {'floor us':>8} {'x floor':>7} {'GB/s':>6}")
    lines = [f"lowlat {transport} (median of graph replays; GB/s = DeepEP-counted bytes of all ranks / time)", head, "-" * len(head)]
    for p in points:
        d, c = p["dispatch"], p["combine"]
        lines.append(
            f"{p['num_ranks']:>5} {p['num_tokens']:>6} | {d['us']:>11.1f} {d['torch_us']:>9.1f} {d['speedup_vs_torch']:>6.1f}x "
            f"{d['floor_us']:>8.1f} {d['x_floor']:>6.2f}x {d['deepep_gbps_aggregate']:>6.0f} | {c['us']:>10.1f} {c['torch_us']:>9.1f} "
            f"{c['speedup_vs_torch']:>6.1f}x {c['floor_us']:>8.1f} {c['x_floor']:>6.2f}x {c['deepep_gbps_aggregate']:>6.0f}")
        halves = p.get("kernel_us_per_rank")
        if halves:
            lines.append("        hook halves per rank (us): " + ", ".join(f"{k} {v:.1f}" for k, v in halves.items()))
    return "\n".join(lines)


def write_json(out: Path, record: dict, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def pyplot():
    """``matplotlib.pyplot`` with a file backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(out: Path, points: list[dict], title: str, stem: str) -> Path | None:
    """Latency against tokens per rank, dispatch and combine, with the baselines; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, op in zip(axes, ("dispatch", "combine")):
        for ranks in sorted({p["num_ranks"] for p in points}):
            series = sorted((p for p in points if p["num_ranks"] == ranks), key=lambda p: p["num_tokens"])
            tokens = [p["num_tokens"] for p in series]
            ax.plot(tokens, [p[op]["us"] for p in series], "o-", label=f"lowlat R={ranks}")
            ax.plot(tokens, [p[op]["torch_us"] for p in series], "s--", label=f"torch reference R={ranks}")
            ax.plot(tokens, [p[op]["floor_us"] for p in series], ":", label=f"HBM floor R={ranks}")
        ax.set_yscale("log")
        style_axis(ax, op, legend_size=7)
    return save_figure(plt, fig, out, title, stem)


def style_axis(ax, title: str, *, legend_size: int = 8) -> None:
    """Microseconds against tokens per rank (log2), with a grid and a legend."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("microseconds")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def save_figure(plt, fig, out: Path, title: str, stem: str) -> Path:
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
