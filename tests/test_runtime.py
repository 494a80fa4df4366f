"""gencnp_fast.runtime: the allocator settings the CLI and the benchmarks apply."""

from __future__ import annotations

import platform

import pytest
import torch

import gencnp_fast
from gencnp_fast import runtime

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")


@glibc
def test_tune_allocator_applies_and_records():
    assert gencnp_fast.tune_allocator(64 << 20, 256 << 20, reserve_bytes=8 << 20) is True
    assert runtime.allocator_settings() == {"mmap_threshold": 64 << 20, "trim_threshold": 256 << 20,
                                            "reserve_bytes": 8 << 20}
    # Torch still allocates and frees correctly afterwards (a block below and one above the threshold).
    for n in (1 << 20, 80 << 20):
        t = torch.ones(n // 4)
        assert float(t.sum()) == n // 4
        del t
    assert runtime.tune_allocator() is True  # idempotent; back to the defaults
    assert runtime.allocator_settings() == {"mmap_threshold": 256 << 20, "trim_threshold": 1 << 30,
                                            "reserve_bytes": 256 << 20}


@glibc
def test_tune_allocator_falls_back_when_glibc_refuses(monkeypatch):
    calls = []

    def fake_mallopt(param, value):
        calls.append((param, value))
        return int(not (param == runtime._M_MMAP_THRESHOLD and value > runtime._GLIBC_MAX_MMAP_THRESHOLD))

    monkeypatch.setattr(runtime, "_mallopt", lambda: fake_mallopt)
    monkeypatch.setattr(runtime, "_settings", {})
    assert runtime.tune_allocator(256 << 20, 1 << 30, reserve_bytes=0) is True
    assert calls == [(-3, 256 << 20), (-3, 32 << 20), (-1, 1 << 30)]
    assert runtime.allocator_settings()["mmap_threshold"] == 32 << 20


def test_tune_allocator_without_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(runtime, "_mallopt", lambda: None)
    monkeypatch.setattr(runtime, "_settings", {})
    assert runtime.tune_allocator() is False
    assert runtime.allocator_settings() is None


@pytest.mark.parametrize("bad", [0, -5, 2**31, 1.5, "64M", True])
def test_tune_allocator_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match="positive number of bytes"):
        runtime.tune_allocator(mmap_threshold=bad)
    with pytest.raises(ValueError, match="trim_threshold"):
        runtime.tune_allocator(trim_threshold=bad)
    if not isinstance(bad, int) or isinstance(bad, bool) or bad < 0:
        with pytest.raises(ValueError, match="reserve_bytes"):
            runtime.tune_allocator(reserve_bytes=bad)


def test_tune_allocator_reserve_must_fit_below_trim_threshold():
    with pytest.raises(ValueError, match="reserve_bytes"):
        runtime.tune_allocator(trim_threshold=64 << 20, reserve_bytes=128 << 20)


@pytest.mark.parametrize("value,applied", [("0", False), ("off", False), ("1", True), (None, True)])
def test_maybe_tune_allocator_env(monkeypatch, value, applied):
    seen = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: seen.append(1) or True)
    if value is None:
        monkeypatch.delenv("GENCNP_FAST_TUNE_MALLOC", raising=False)
    else:
        monkeypatch.setenv("GENCNP_FAST_TUNE_MALLOC", value)
    assert runtime.maybe_tune_allocator() is applied
    assert bool(seen) is applied


def test_cli_applies_the_allocator_setting(monkeypatch, capsys):
    from gencnp_fast import cli

    seen = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: seen.append(1) or True)
    monkeypatch.delenv("GENCNP_FAST_TUNE_MALLOC", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["explain", "--target", "/nonexistent/model.pt", "--generator", "g.pt", "--out", "o"])
    assert seen == [1]
