"""A fuzz over the CLI's inputs (issue #12): random and mutated bytes as ``.npz`` / ``.pt`` files, random option
values. Every run must end with exit status 0 or 2 and no traceback (an unexpected exception escapes ``main`` and
fails the test). In-process (``main(argv)``), bounded to well under a minute on 2 cores."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gencnp_fast.cli import main  # noqa: E402
from gencnp_fast.data import mnist_split  # noqa: E402
from gencnp_fast.generator import GenCNP  # noqa: E402
from gencnp_fast.models import mnist_vgg  # noqa: E402
from gencnp_fast.target import save_target  # noqa: E402

# Most examples end at the first check (milliseconds); valid runs (training, a mutated file that still loads) take a
# few tenths of a second, more on a loaded machine. Each test stops running its examples after BUDGET_S seconds, so
# the file stays well under a minute whatever the machine's load. The budget is checked after an example's draws:
# checked before them, an example replayed after the budget ran out drew nothing the second time, and hypothesis
# failed the test as FlakyStrategyDefinition (seen in most runs under pytest-xdist, where the budget runs out).
BUDGET_S = 12.0
_started = {}


def fuzz(n: int):
    return settings(max_examples=n, deadline=20_000,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def over_budget(test: str) -> bool:
    return time.monotonic() - _started.setdefault(test, time.monotonic()) > BUDGET_S


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    tr, _ = mnist_split()
    idx = torch.arange(0, 4000, 50)  # 80 images, 8 per class
    np.savez(d / "d.npz", x=(tr.x[idx, 0] * 255).round().to(torch.uint8).numpy(), y=tr.y[idx].numpy())
    torch.manual_seed(0)
    model = mnist_vgg(width=2).eval()
    save_target(model, str(d / "t.pt"))
    torch.manual_seed(0)
    GenCNP(model, tr.x[:2], d=4, code_dim=4).save(str(d / "g.pt"))
    assert main(["explain", "--target", str(d / "t.pt"), "--generator", str(d / "g.pt"), "--data", str(d / "d.npz"),
                 "--out", str(d / "ex"), "--quiet"]) == 0
    return {name: (d / rel).read_bytes() for name, rel in (("npz", "d.npz"), ("target", "t.pt"),
                                                           ("generator", "g.pt"), ("pathways", "ex/pathways.pt"))}


@pytest.fixture(autouse=True)
def _no_allocator_tuning(monkeypatch):
    monkeypatch.setenv("GENCNP_FAST_TUNE_MALLOC", "0")  # it reserves 256 MiB per call; not what is fuzzed here
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def run(argv) -> int:
    """``main(argv)`` with stdout / stderr captured: the exit status, after checking there is no traceback and, for
    an error, exactly one line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    text = err.getvalue()
    assert code in (0, 2), (code, argv, text)
    assert "Traceback" not in text + out.getvalue(), text
    if code == 2:
        assert len([ln for ln in text.splitlines() if ln.strip()]) == 1, text
    return code


def mutated(valid: bytes):
    """Random bytes, or ``valid`` with a few bytes flipped, truncated, or both."""
    flips = st.lists(st.tuples(st.integers(0, max(len(valid) - 1, 0)), st.integers(1, 255)), min_size=1, max_size=8)

    def flip(changes):
        b = bytearray(valid)
        for i, x in changes:
            b[i] ^= x
        return bytes(b)

    return st.one_of(
        st.binary(max_size=512),
        flips.map(flip),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(flips.map(flip), st.integers(0, len(valid))).map(lambda t: t[0][:t[1]]),
    )


def _write(d: str, name: str, data: bytes) -> str:
    path = os.path.join(d, name)
    with open(path, "wb") as fh:
        fh.write(data)
    return path


@fuzz(150)
@given(data=st.data())
def test_fuzz_input_files(files, data):
    """One of the four input files replaced by random or mutated bytes."""
    which = data.draw(st.sampled_from(["npz", "target", "generator", "pathways"]))
    blob = data.draw(mutated(files[which]))
    if over_budget("files"):
        return
    with tempfile.TemporaryDirectory() as d:
        p = {k: _write(d, f"{k}.{'npz' if k == 'npz' else 'pt'}", blob if k == which else v)
             for k, v in files.items()}
        if which == "pathways":
            argv = ["evaluate", "--target", p["target"], "--pathways", p["pathways"]]
        else:
            argv = ["evaluate", "--target", p["target"], "--generator", p["generator"], "--data", p["npz"],
                    "--out", os.path.join(d, "out"), "--no-timing", "--no-suite", "--quiet", "--test-limit", "8"]
        run(argv)


def _values(ints=(-2, 3), floats=True):
    """Option values: small ints, floats (NaN and infinity included), junk text."""
    vals = [st.integers(*ints).map(str), st.sampled_from(["", "x", "1e999", "-0", "0x10", "1.5", " 2", "nan"])]
    if floats:
        vals.append(st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr))
    return st.one_of(*vals)


TRAIN_OPTIONS = {
    "--epochs": _values((-1, 2), floats=False), "--batch-size": _values((-1, 70)), "--lr": _values(),
    "--tau": _values(), "--lambda-sp": _values(), "--lambda-cls": _values(), "--soft-fraction": _values(),
    "--val-fraction": _values(), "--test-fraction": _values(), "--seed": st.one_of(_values(), st.just(str(2**40))),
    "--hidden": _values((-1, 6), floats=False), "--code-dim": _values((-1, 6), floats=False),
    "--limit": _values((-1, 40), floats=False), "--checkpoint-every": _values((-1, 3), floats=False),
}


@fuzz(80)
@given(data=st.data())
def test_fuzz_train_options(files, data):
    opts = data.draw(st.dictionaries(st.sampled_from(sorted(TRAIN_OPTIONS)), st.just(None), min_size=1, max_size=4))
    argv = []
    for k in opts:
        argv += [k, data.draw(TRAIN_OPTIONS[k], label=k)]
    if over_budget("train"):
        return
    with tempfile.TemporaryDirectory() as d:
        p = {k: _write(d, f"{k}.{'npz' if k == 'npz' else 'pt'}", v) for k, v in files.items()}
        base = ["train", "--target", p["target"], "--data", p["npz"], "--out", os.path.join(d, "run"), "--quiet"]
        if "--epochs" not in opts:
            base += ["--epochs", "1"]
        for k, default in (("--hidden", "4"), ("--code-dim", "4")):
            if k not in opts:
                base += [k, default]
        if run(base + argv) == 0:  # a valid run can be resumed with the same options
            run(base + argv + ["--resume"])


EVAL_OPTIONS = {"--batch-size-eval": _values((-1, 50)), "--test-limit": _values((-1, 12), floats=False),
                "--split-seed": _values(), "--test-fraction": _values(), "--limit": _values((-1, 40), floats=False)}


@fuzz(100)
@given(data=st.data())
def test_fuzz_explain_evaluate_train_target_options(files, data):
    cmd = data.draw(st.sampled_from(["explain", "evaluate", "train-target"]))
    options = dict(EVAL_OPTIONS)
    if cmd == "train-target":
        options = {"--epochs": _values((-1, 1), floats=False), "--batch-size": _values((-1, 50)), "--lr": _values(),
                   "--num-classes": _values((-1, 12), floats=False), "--limit": _values((-1, 30), floats=False),
                   "--test-fraction": _values()}
    opts = data.draw(st.dictionaries(st.sampled_from(sorted(options)), st.just(None), min_size=1, max_size=3))
    argv = []
    for k in opts:
        argv += [k, data.draw(options[k], label=k)]
    if over_budget("other"):
        return
    with tempfile.TemporaryDirectory() as d:
        p = {k: _write(d, f"{k}.{'npz' if k == 'npz' else 'pt'}", v) for k, v in files.items()}
        if cmd == "train-target":
            base = [cmd, "--model", "mnist_vgg", "--out", os.path.join(d, "t2.pt"), "--data", p["npz"], "--quiet"]
            for k, default in (("--epochs", "1"), ("--limit", "30")):
                if k not in opts:
                    base += [k, default]
        else:
            base = [cmd, "--target", p["target"], "--generator", p["generator"], "--data", p["npz"], "--out",
                    os.path.join(d, "out"), "--quiet"] + (["--no-timing", "--no-suite"] if cmd == "evaluate" else [])
        run(base + argv)
