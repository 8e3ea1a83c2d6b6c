"""featstack.heartbeat: a step says what it does before it starts, and that it still does while it runs (issue #32)."""
import os
import sys
import threading
import time

import pytest

from featstack import heartbeat as hb


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(hb, "INTERVAL", 0.05)
    monkeypatch.setattr(hb, "ANNOUNCE_AFTER", 0)  # said before the step starts


def test_a_long_step_is_announced_then_says_it_still_runs(fast, capsys):
    with hb.heartbeat("loading resnet50 model"):
        assert capsys.readouterr().out == "loading resnet50 model …\n"  # said before the step's work
        time.sleep(0.4)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) >= 3, lines  # every 0.05 s (at least 3 of 8 on a loaded machine)
    assert all(l.startswith("still loading resnet50 model (") and l.endswith(" s)") for l in lines), lines
    time.sleep(0.2)
    assert capsys.readouterr().out == ""  # the thread ended with the step
    assert not [t for t in threading.enumerate() if t.name == "featstack-heartbeat"]


def test_a_step_is_named_once_it_has_run_announce_after_seconds_and_a_quick_one_not_at_all(monkeypatch, capsys):
    # A command that fails at once (a damaged file) leaves its error alone on stderr: one line.
    monkeypatch.setattr(hb, "ANNOUNCE_AFTER", 0.1)
    monkeypatch.setattr(hb, "INTERVAL", 10)
    with hb.heartbeat("scoring outliers"):
        pass
    assert capsys.readouterr().out == ""
    with hb.heartbeat("loading run r"):
        time.sleep(0.3)
    assert capsys.readouterr().out == "loading run r …\n"


def test_output_of_its_own_resets_the_clock(monkeypatch):
    monkeypatch.setattr(hb, "INTERVAL", 0.4)
    said = []
    with hb.heartbeat("extracting", said.append, announce=False) as beat:
        for k in range(6):  # the caller prints every 0.05 s: nothing is silent for 0.4 s, the heartbeat stays quiet
            time.sleep(0.05)
            beat.set(f"batch {k}")
            beat.said()
        assert said == []
        time.sleep(0.55)  # now it is: the heartbeat names the current phase
    assert said and said[0].startswith("still batch 5 ("), said


def test_stderr_printer_and_own_format(fast, capsys):
    with hb.heartbeat("x", hb.printer("stderr", prefix="featstack: ", end=" "), announce=False,
                      still="{seconds:.0f} s ..."):
        time.sleep(0.2)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("featstack: 0 s ... "), captured


def test_stderr_lines_reach_the_user_while_a_library_import_silences_descriptor_2(fast, capfd, monkeypatch):
    # TensorFlow's import runs with fd 2 pointed at /dev/null (quiet.silenced_stderr); a heartbeat on sys.stderr
    # during it must still be seen (issue #32: "loading Keras" was silent for 35 s).
    from featstack.quiet import silenced_stderr
    monkeypatch.setattr(sys, "stderr", os.fdopen(2, "w", closefd=False))  # as in a command: sys.stderr is fd 2
    with silenced_stderr():
        with hb.heartbeat("loading Keras", hb.printer("stderr")):
            time.sleep(0.2)
    err = capfd.readouterr().err
    assert "loading Keras …" in err and "still loading Keras (" in err, err
