"""Benchmark plumbing: ratio tables printed at the end of a run, and result snapshots.

Every end-to-end benchmark records its median under a *case key* (model, batch, masks) and a *variant* (dense,
reference, fast backend). At the end of the run the table puts the variants of one case side by side: the speedup of
the fast path over the dense masked reference, and that speedup as a fraction of the ideal FLOP ratio and of the
bytes-based bound (DESIGN §6). ``--save-results NAME`` writes the table to ``benchmarks/results/NAME.md`` and
``NAME.json``, with the machine it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch

RESULTS: Dict[tuple, Dict[str, object]] = {}  # (model, batch, sharing, density) -> {"fast:<backend>": s, ...}
BASELINES: Dict[tuple, Dict[str, float]] = {}  # (model, batch) -> {"dense": s, "reference": s}


def pytest_addoption(parser):
    parser.addoption("--save-results", default=None, help="write the ratio table to benchmarks/results/NAME.{md,json}")


def record(case: tuple, variant: str, benchmark, **info) -> None:
    """Store a finished benchmark's median (seconds) for the summary table.

    ``case`` is ``(model, batch)`` for the ``dense`` and ``reference`` variants (their time does not depend on the
    mask) and ``(model, batch, sharing, density)`` for ``fast:<backend>``.
    """
    entry = (BASELINES if len(case) == 2 else RESULTS).setdefault(case, {})
    entry[variant] = benchmark.stats.stats.median
    entry.update(info)
    benchmark.extra_info.update({k: v for k, v in info.items() if isinstance(v, (int, float, str))})


def machine() -> Dict[str, object]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from gencnp_fast import ops

        info["kernel_isa"] = ops.cpu_info()
    except Exception:  # extension missing: the table says so through its backends
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def _rows() -> List[Dict[str, object]]:
    rows = []
    for case, e in sorted(RESULTS.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        fast = [k for k in e if k.startswith("fast:")]
        for f in fast:
            base = BASELINES.get(case[:2], {})
            ref, dense = base.get("reference"), base.get("dense")
            speed = ref / e[f] if ref else float("nan")
            ideal = e.get("ideal_flop_ratio", float("nan"))
            ideal_b = e.get("ideal_bytes_ratio", float("nan"))
            rows.append(dict(
                model=case[0], batch=case[1], sharing=case[2], density=case[3], backend=f[5:],
                dense_ms=1e3 * dense if dense else float("nan"), reference_ms=1e3 * ref if ref else float("nan"),
                fast_ms=1e3 * e[f], speedup=speed, ideal_flop_ratio=ideal, frac_of_ideal=speed / ideal,
                ideal_bytes_ratio=ideal_b, frac_of_bytes_bound=speed / ideal_b,
                vs_dense=(dense / e[f]) if dense else float("nan"),
            ))
    return rows


_COLS = [("model", "{}"), ("batch", "{}"), ("sharing", "{}"), ("density", "{}"), ("backend", "{}"),
         ("dense_ms", "{:.2f}"), ("reference_ms", "{:.2f}"), ("fast_ms", "{:.2f}"), ("speedup", "{:.2f}"),
         ("ideal_flop_ratio", "{:.2f}"), ("frac_of_ideal", "{:.2f}"), ("ideal_bytes_ratio", "{:.2f}"),
         ("frac_of_bytes_bound", "{:.2f}"), ("vs_dense", "{:.2f}")]


def _table(rows) -> str:
    head = "| " + " | ".join(c for c, _ in _COLS) + " |"
    sep = "|" + "|".join("---" for _ in _COLS) + "|"
    body = ["| " + " | ".join(f.format(r[c]) for c, f in _COLS) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = _rows()
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("=", "pathway forward: speedup over the dense masked reference (medians)")
    tr.write_line("speedup = reference_ms / fast_ms; frac_of_ideal = speedup / (dense FLOPs / pathway FLOPs); "
                  "frac_of_bytes_bound = speedup / (dense bytes / pathway bytes); vs_dense = dense_ms / fast_ms")
    tr.write_line(_table(rows))
    name = config.getoption("--save-results")
    if name:
        out = Path(__file__).parent / "results"
        out.mkdir(exist_ok=True)
        m = machine()
        cmd = "pytest " + " ".join(config.invocation_params.args)
        md = [f"# {name}", "", f"Command: `{cmd}`", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in m.items()), "",
              "speedup = reference_ms / fast_ms (dense masked model over fast path, same run); frac_of_ideal = "
              "speedup / ideal FLOP ratio; frac_of_bytes_bound = speedup / (dense bytes / pathway bytes); "
              "vs_dense = dense_ms / fast_ms. All times are medians.", "", _table(rows), ""]
        (out / f"{name}.md").write_text("\n".join(md))
        (out / f"{name}.json").write_text(json.dumps({"command": cmd, "machine": m, "rows": rows}, indent=1))
        tr.write_line(f"saved benchmarks/results/{name}.md and .json")


@pytest.fixture
def record_result():
    return record
