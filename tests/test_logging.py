"""Progress in a log file: plain lines at intervals, never carriage-return frames."""

from __future__ import annotations

import logging

from ddist import logging as dlog


def test_progress_in_a_log_writes_lines_not_frames(monkeypatch, caplog, capsys):
    monkeypatch.setenv("DDIST_PROGRESS", "1")
    monkeypatch.setattr(dlog, "LOG_INTERVAL", 0.0)  # a line on every update, to see them
    with caplog.at_level(logging.INFO, logger="ddist"):
        bar = dlog.progress(desc="recover", total=3)  # pytest's stderr is not a terminal
        for _ in range(3):
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any("recover" in line and "3/3" in line for line in lines), lines
    assert "\r" not in capsys.readouterr().err


def test_progress_is_silent_when_switched_off(monkeypatch, caplog, capsys):
    monkeypatch.setenv("DDIST_PROGRESS", "0")
    with caplog.at_level(logging.INFO, logger="ddist"):
        assert list(dlog.progress(range(4), desc="x")) == [0, 1, 2, 3]
    assert not caplog.records and capsys.readouterr().err == ""
