"""The console line of a step: every objective metric shown, the cross-entropy only when it is not the loss."""

from __future__ import annotations

from logger import format_event


def test_console_line_shows_metrics_that_happen_to_equal_the_loss():
    line = format_event({"step": 3, "loss": 0.0, "lr": 1e-3, "tokens": 10, "reward": 0.0, "entropy": 9.03})
    assert "reward 0" in line and "entropy 9.03" in line and "tokens" not in line


def test_console_line_leaves_out_the_cross_entropy_that_is_the_loss():
    assert "ce " not in format_event({"step": 1, "loss": 2.5, "ce": 2.5})
    assert "ce 2.4" in format_event({"step": 1, "loss": 2.6, "ce": 2.4, "kd": 0.2})
