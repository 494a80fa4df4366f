"""Benchmark plumbing: ratio tables printed at the end of a run, and result snapshots.

Every end-to-end benchmark records its median under a *case key* (model, batch, masks) and a *variant* (dense,
reference, fast backend). At the end of the run the table puts the variants of one case side by side: the speedup of
the fast path over the dense masked reference, and that speedup as a fraction of the ideal FLOP ratio and of the
bytes-based bound (docs/design.md §6). ``--save-results NAME`` writes the table to ``benchmarks/results/NAME.md`` and
``NAME.json``, with the machine it ran on.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import torch

RESULTS: Dict[tuple, Dict[str, object]] = {}  # (model, batch, sharing, density) -> {"fast:<backend>": s, ...}
BASELINES: Dict[tuple, Dict[str, float]] = {}  # (model, batch) -> {"dense": s, "reference": s}


def pytest_addoption(parser):
    parser.addoption("--save-results", default=None, help="write the ratio table to benchmarks/results/NAME.{md,json}")


_SESSION: Dict[str, object] = {}  # "config" once configured: the snapshot is rewritten after every recorded case


def pytest_configure(config):
    # Steady-state CPU timings: keep activations in the heap instead of a fresh mmap per tensor (gencnp_fast.runtime).
    # Every variant of a table runs in this one process, so the setting applies to all of them alike.
    from gencnp_fast.runtime import maybe_tune_allocator

    maybe_tune_allocator()
    _SESSION["config"] = config


def pathway_baselines(model, path, x, dense: bool = True) -> Dict[str, Callable[[], object]]:
    """The baselines a fast-path case is paired with: the dense masked reference and (``dense``) the dense model."""
    import gencnp_fast as g

    def reference():
        with torch.no_grad():
            return g.reference_pathway_forward(model, path, x)

    def dense_model():
        with torch.no_grad():
            return model(x)

    return {"reference": reference, **({"dense": dense_model} if dense else {})}


def run_paired(benchmark, fn: Callable[[], object], baselines: Dict[str, Callable[[], object]], rounds: int,
               warmup_rounds: int = 1, sync: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Benchmark ``fn`` with pedantic rounds; before each round, pedantic's untimed setup times every baseline once.

    Returns ``{"paired_<name>": median seconds, "ratio_<name>": median over rounds of baseline / fn}``: each ratio
    compares two runs seconds apart, which a shared machine's minute-scale drifts cannot tilt. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before each baseline's clock stops; ``fn`` must synchronize itself.
    """
    paired: Dict[str, List[float]] = {k: [] for k in baselines}

    def setup():
        for k, f in baselines.items():
            t0 = time.perf_counter()
            f()
            if sync is not None:
                sync()
            paired[k].append(time.perf_counter() - t0)

    benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    fast_rounds = list(benchmark.stats.stats.data)  # the timed rounds (warm-up rounds are not recorded)
    extra = {}
    for k, v in paired.items():
        v = v[warmup_rounds : warmup_rounds + len(fast_rounds)]  # setup also runs before each warm-up round
        if v:
            extra[f"paired_{k}"] = statistics.median(v)
            extra[f"ratio_{k}"] = statistics.median(r / f for r, f in zip(v, fast_rounds))
    return extra


def record(case: tuple, variant: str, benchmark, **info) -> None:
    """Store a finished benchmark's median (seconds) for the summary table.

    ``case`` is ``(model, batch)`` for the ``dense`` and ``reference`` variants (their time does not depend on the
    mask) and ``(model, batch, sharing, density)`` for ``fast:<backend>``.
    """
    entry = (BASELINES if len(case) == 2 else RESULTS).setdefault(case, {})
    entry[variant] = benchmark.stats.stats.median
    # paired medians and ratios belong to this variant (several backends of one case are paired separately)
    own = {k: v for k, v in info.items() if k.startswith(("paired_", "ratio_"))}
    entry.setdefault("paired", {})[variant] = own
    entry.update({k: v for k, v in info.items() if k not in own})
    benchmark.extra_info.update({k: v for k, v in info.items() if isinstance(v, (int, float, str))})
    _save_partial()


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
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    from gencnp_fast.runtime import allocator_settings

    info["malloc"] = allocator_settings() or "glibc defaults"
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
            # paired medians (timed between the fast path's rounds) when the benchmark took them
            own = e.get("paired", {}).get(f, {})
            ref = own.get("paired_reference", base.get("reference"))
            dense = own.get("paired_dense", base.get("dense"))
            speed = own.get("ratio_reference", ref / e[f] if ref else float("nan"))
            ideal = e.get("ideal_flop_ratio", float("nan"))
            ideal_b = e.get("ideal_bytes_ratio", float("nan"))
            rows.append(dict(
                model=case[0], batch=case[1], sharing=case[2], density=case[3], backend=f[5:],
                dense_ms=1e3 * dense if dense else float("nan"), reference_ms=1e3 * ref if ref else float("nan"),
                fast_ms=1e3 * e[f], speedup=speed, ideal_flop_ratio=ideal, frac_of_ideal=speed / ideal,
                ideal_bytes_ratio=ideal_b, frac_of_bytes_bound=speed / ideal_b,
                vs_dense=own.get("ratio_dense", (dense / e[f]) if dense else float("nan")),
            ))
    return rows


_COLS = [("model", "{}"), ("batch", "{}"), ("sharing", "{}"), ("density", "{}"), ("backend", "{}"),
         ("dense_ms", "{:.2f}"), ("reference_ms", "{:.2f}"), ("fast_ms", "{:.2f}"), ("speedup", "{:.2f}"),
         ("ideal_flop_ratio", "{:.2f}"), ("frac_of_ideal", "{:.2f}"), ("ideal_bytes_ratio", "{:.2f}"),
         ("frac_of_bytes_bound", "{:.2f}"), ("vs_dense", "{:.2f}")]


# Explainers (benchmarks/test_bench_explain.py): (model, batch) -> {method: seconds per batch}
EXPLAIN: Dict[tuple, Dict[str, float]] = {}
EXPLAIN_METHODS = ["dense", "dense_fwd_bwd", "gencnp", "neuron_mct", "cdrp", "gencnp_full"]


def record_explain(model: str, batch: int, method: str, timing) -> None:
    """Store an explainer's median (seconds per batch) for the explainer table: ``timing`` is a finished benchmark
    or a median measured beside it."""
    EXPLAIN.setdefault((model, batch), {})[method] = (
        float(timing) if isinstance(timing, (int, float)) else timing.stats.stats.median)
    _save_partial()


def _explain_rows() -> List[Dict[str, object]]:
    rows = []
    for (model, batch), e in sorted(EXPLAIN.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        nan = float("nan")
        per_img = {m: 1e3 * e[m] / batch if m in e else nan for m in EXPLAIN_METHODS}
        row = dict(model=model, batch=batch, **{f"{m}_ms_per_img": per_img[m] for m in EXPLAIN_METHODS})
        g, d = per_img["gencnp"], per_img["dense"]
        row["gencnp_vs_cdrp"] = per_img["cdrp"] / g
        row["gencnp_vs_neuron_mct"] = per_img["neuron_mct"] / g
        row["gencnp_in_dense_fwds"] = g / d
        row["gencnp_full_in_dense_fwds"] = per_img["gencnp_full"] / d
        row["cdrp_in_dense_fwds"] = per_img["cdrp"] / d
        row["fwd_bwd_in_dense_fwds"] = per_img["dense_fwd_bwd"] / d
        rows.append(row)
    return rows


_EXPLAIN_COLS = [("model", "{}"), ("batch", "{}")] + [(f"{m}_ms_per_img", "{:.3f}") for m in EXPLAIN_METHODS] + [
    ("gencnp_vs_cdrp", "{:.1f}"), ("gencnp_vs_neuron_mct", "{:.2f}"), ("gencnp_in_dense_fwds", "{:.2f}"),
    ("gencnp_full_in_dense_fwds", "{:.2f}"),
    ("cdrp_in_dense_fwds", "{:.1f}"), ("fwd_bwd_in_dense_fwds", "{:.2f}")]

_PATHWAY_LEGEND = ("reference_ms and dense_ms are paired where measured so (CPU: dense at density 1; GPU: both at "
                   "every density): timed just before each of the fast path's rounds of the same case, otherwise "
                   "the separate dense / reference benchmark. speedup = median over rounds of reference / fast; "
                   "frac_of_ideal = speedup / ideal FLOP ratio; frac_of_bytes_bound = speedup / (dense bytes / "
                   "pathway bytes); vs_dense = the same median ratio for the dense model. Times are medians.")
_EXPLAIN_LEGEND = ("Explanation cost per image (medians of interleaved rounds, one batch per call): dense = the "
                   "target's forward; dense_fwd_bwd = forward + backward to the input (the work of one CDRP step); gencnp = "
                   "GenCNP.explain (dense capture + generator); gencnp_full = that and the pathway's fast forward (the "
                   "explained logits); neuron_mct / cdrp = the baselines' binary pathways (CDRP: 30 SGD steps). gencnp_vs_X = X_ms / gencnp_ms; *_in_dense_fwds = cost / dense forward.")


def _cell(value, fmt: str) -> str:
    """A table cell; a value not measured in this case (NaN) is shown as a dash."""
    if isinstance(value, float) and math.isnan(value):
        return "–"
    return fmt.format(value)


def _table(rows, cols=None) -> str:
    cols = cols or _COLS
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(_cell(r[c], f) for c, f in cols) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def _sections(rows, erows) -> List[str]:
    sections: List[str] = []
    if rows:
        sections += [_PATHWAY_LEGEND, "", _table(rows), ""]
    if erows:
        sections += [_EXPLAIN_LEGEND, "", _table(erows, _EXPLAIN_COLS), ""]
    return sections


def _json_safe(obj):
    """Strict JSON: a value not measured in this case (NaN) is written as null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_snapshot(config, rows, erows, partial: bool = False) -> Optional[Path]:
    name = config.getoption("--save-results", default=None)
    if not name or (not rows and not erows):
        return None
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    m = machine() if "machine" not in _SESSION else _SESSION["machine"]
    _SESSION["machine"] = m
    cmd = "pytest " + " ".join(config.invocation_params.args)
    status = ["", "(partial: written after each case; the run has not finished)"] if partial else []
    md = [f"# {name}", "", f"Command: `{cmd}`", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in m.items())]
    (out / f"{name}.md").write_text("\n".join(md + status + [""] + _sections(rows, erows)))
    data = {"command": cmd, "machine": m, "complete": not partial}
    if rows:
        data["rows"] = rows
    if erows:
        data["explain_rows"] = erows
    (out / f"{name}.json").write_text(json.dumps(_json_safe(data), indent=1, allow_nan=False))
    return out / f"{name}.md"


def _save_partial() -> None:
    """Rewrite the snapshot after every recorded case, so that a run cut short (a time limit on a lent GPU
    machine) still leaves what it measured."""
    config = _SESSION.get("config")
    if config is not None:
        _write_snapshot(config, _rows(), _explain_rows(), partial=True)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows, erows = _rows(), _explain_rows()
    if not rows and not erows:
        return
    tr = terminalreporter
    if rows:
        tr.write_sep("=", "pathway forward: speedup over the dense masked reference (medians)")
        tr.write_line(_PATHWAY_LEGEND)
        tr.write_line(_table(rows))
    if erows:
        tr.write_sep("=", "explainers: cost per image (medians)")
        tr.write_line(_EXPLAIN_LEGEND)
        tr.write_line(_table(erows, _EXPLAIN_COLS))
    path = _write_snapshot(config, rows, erows)
    if path is not None:
        tr.write_line(f"saved {path.with_suffix('.md')} and .json")


@pytest.fixture
def record_result():
    return record


@pytest.fixture
def record_explainer():
    return record_explain


@pytest.fixture
def paired():
    """:func:`run_paired`: benchmark a function with baselines timed between its rounds."""
    return run_paired


@pytest.fixture
def baselines():
    """:func:`pathway_baselines`: the reference (and dense model) a fast-path case is timed against."""
    return pathway_baselines


# Explain throughput (benchmarks/test_bench_throughput.py) --------------------------------------------------------
# A table of its own, added beside the ones above (which are left as they are): (device, model, batch) -> one row.
THROUGHPUT: Dict[tuple, Dict[str, object]] = {}

_THROUGHPUT_COLS = [("device", "{}"), ("model", "{}"), ("batch", "{}"), ("threads", "{}"), ("backend", "{}"),
                    ("density", "{:.3f}"), ("sample_iou", "{:.2f}"), ("rounds", "{}"), ("dense_ips", "{:.1f}"),
                    ("explain_ips", "{:.1f}"), ("evaluate_ips", "{:.1f}"), ("explain_vs_dense", "{:.3f}"),
                    ("evaluate_vs_dense", "{:.3f}"), ("must_reach", "{:.2f}"), ("meets", "{}")]
_THROUGHPUT_LEGEND = ("Explain throughput at 224x224 (images/s = batch / median seconds per batch of interleaved "
                      "rounds): dense = target(x); explain = explain_batch (dense capture + GEN-CNP generator + "
                      "fast_pathway_forward); evaluate = explain + confidence_sums + PackedPathways.append. "
                      "X_vs_dense = median over rounds of dense seconds / X seconds (= X images/s relative to dense); "
                      "must_reach = the issue's floor of explain_vs_dense; density = kept fraction of the calibrated "
                      "generator's hard masks; sample_iou = mean IoU of two samples' masks (1: one shared mask).")


def record_throughput(device: str, model: str, batch: int, **row) -> Dict[str, object]:
    """Store one throughput row (see :data:`_THROUGHPUT_COLS`; a column not given is shown as a dash), rewrite the
    partial snapshot, and return the machine (:func:`machine`, taken once per session)."""
    THROUGHPUT[(device, model, batch)] = dict(device=device, model=model, batch=batch, **row)
    _SESSION.setdefault("machine", machine())
    _write_throughput(partial=True)
    return _SESSION["machine"]


def _throughput_rows() -> List[Dict[str, object]]:
    nan = float("nan")
    return [{c: r.get(c, nan) if r.get(c) is not None else nan for c, _ in _THROUGHPUT_COLS}
            for _, r in sorted(THROUGHPUT.items(), key=lambda kv: tuple(str(k) for k in kv[0]))]


def _write_throughput(partial: bool) -> Optional[Path]:
    """``--save-results NAME``: ``results/NAME.{md,json}`` when only the throughput benchmark ran, else
    ``results/NAME_throughput.{md,json}`` (NAME.md then belongs to the tables above)."""
    config = _SESSION.get("config")
    name = config.getoption("--save-results", default=None) if config is not None else None
    if not name or not THROUGHPUT:
        return None
    stem = name if _SESSION.get("throughput_alone", True) else f"{name}_throughput"
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    m = _SESSION.get("machine") or machine()
    _SESSION["machine"] = m
    cmd = "pytest " + " ".join(config.invocation_params.args)
    rows = _throughput_rows()
    status = ["", "(partial: written after each case; the run has not finished)"] if partial else []
    md = [f"# {stem}", "", f"Command: `{cmd}`", "", "Machine: " + ", ".join(f"{k}={v}" for k, v in m.items())]
    md += status + ["", _THROUGHPUT_LEGEND, "", _table(rows, _THROUGHPUT_COLS), ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    data = {"command": cmd, "machine": m, "complete": not partial, "throughput_rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(_json_safe(data), indent=1, allow_nan=False))
    return out / f"{stem}.md"


class _ThroughputReport:
    """The throughput table's terminal summary and final snapshot (a plugin object: the hooks above stay as they
    are)."""

    def pytest_collection_finish(self, session):
        _SESSION["throughput_alone"] = all("test_bench_throughput" in item.nodeid for item in session.items)

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not THROUGHPUT:
            return
        tr = terminalreporter
        tr.write_sep("=", "explain throughput at 224x224: images/s (medians of interleaved rounds)")
        tr.write_line(_THROUGHPUT_LEGEND)
        tr.write_line(_table(_throughput_rows(), _THROUGHPUT_COLS))
        for r in THROUGHPUT.values():
            if r.get("note"):
                tr.write_line(f"{r['device']} {r['model']} b{r['batch']}: {r['note']}")
        path = _write_throughput(partial=False)
        if path is not None:
            tr.write_line(f"saved {path} and .json")


def pytest_sessionstart(session):
    if not session.config.pluginmanager.has_plugin("gencnp_throughput_report"):
        session.config.pluginmanager.register(_ThroughputReport(), "gencnp_throughput_report")


@pytest.fixture
def record_throughput_row():
    """:func:`record_throughput`: one row of the explain-throughput table."""
    return record_throughput
