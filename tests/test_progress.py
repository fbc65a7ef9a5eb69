"""Progress lines in logs (no terminal): throughput, at most one line per interval, a closing line for long loops."""

from __future__ import annotations

import logging
import time

import pytest

from hybrid_retrieval.progress import EVERY_ENV, Progress, every_seconds


def test_progress_logs_throughput_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hybrid_retrieval.progress")
    with Progress(200, "encode queries", "texts", every_s=0.05) as progress:
        for _ in range(10):
            progress.update(10)  # fast: no line yet
        assert not caplog.records
        time.sleep(0.06)
        progress.set_note("loss 1.000")
        progress.update(0)
        time.sleep(0.06)
        progress.update(100)  # the last step: its line is the closing one, written once
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("encode queries: 100/200 texts, ") and "texts/s" in lines[0]
    assert lines[0].endswith("(loss 1.000)")
    assert lines[-1].startswith("encode queries: 200/200 texts") and lines[-1].endswith("(done)") and len(lines) == 2


def test_a_short_loop_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hybrid_retrieval.progress")
    with Progress(5, "train", "steps", every_s=60) as progress:
        progress.update(5)
    assert not caplog.records


def test_the_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVERY_ENV, "2.5")
    assert every_seconds() == 2.5
    monkeypatch.setenv(EVERY_ENV, "often")
    with pytest.raises(ValueError, match=EVERY_ENV):
        every_seconds()
