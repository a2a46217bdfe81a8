"""models/progress.py: the line format, when lines are written (fake clock), what loops and the CLI say."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from loom.data.imageio import write_png
from loom.datasets.fabric import render_sample
from models import progress as progress_module
from models.progress import format_duration, format_rate, progress, progress_line, track
from models.student.training import TrainConfig, train_segmenter

pytestmark = pytest.mark.usefixtures("single_thread")


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Captured(logging.Handler):
    """Keeps (time on the fake clock, message) of every record."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((self.clock.now, record.getMessage()))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Lines(logging.Handler):
    """Keeps the message of every record."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def progress_lines() -> Iterator[list[str]]:
    """What the ``models.progress`` logger writes (its own handler: importing Prefect during a test replaces
    the root logger's handlers, caplog's included)."""
    log = logging.getLogger("models.progress")
    handler, level = Lines(), log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield handler.lines
    log.removeHandler(handler)
    log.setLevel(level)


@pytest.fixture
def captured(clock: FakeClock) -> Iterator[tuple[logging.Logger, Captured]]:
    """A logger of its own (as a caller would pass one) and what it received, timed on the fake clock."""
    log = logging.getLogger(f"test.progress.{id(clock)}")
    log.setLevel(logging.INFO)
    log.propagate = False
    handler = Captured(clock)
    log.addHandler(handler)
    yield log, handler
    log.removeHandler(handler)


# ---- formatting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.04, "0.0 s"), (8.46, "8.5 s"), (40.4, "40 s"), (160, "2 min 40 s"), (3725, "1 h 02 min")],
)
def test_durations_read_as_a_person_says_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_unknown_duration() -> None:
    assert format_duration(float("inf")) == "unknown"


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (0.8123, "0.81 images/s"),
        (12.345, "12.3 images/s"),
        (1234.5, "1234 images/s"),
        (0.0123, "0.012 images/s"),
    ],
)
def test_rates_keep_the_digits_that_matter(rate: float, text: str) -> None:
    assert format_rate(rate, "images") == text


def test_line_while_running_has_count_rate_and_eta() -> None:
    line = progress_line("pseudo-label", 120, 247, "images", elapsed=148.0)
    # 120 images in 148 s: 0.81 images/s, 127 left -> 157 s
    assert line == "pseudo-label: 120/247 images, 0.81 images/s, ETA 2 min 37 s"


def test_line_before_the_first_item_and_without_a_total() -> None:
    assert progress_line("train", 0, 600, "steps", elapsed=0.0) == "train: 0/600 steps"
    assert progress_line("sample", 30, None, "pairs", elapsed=10.0) == "sample: 30 pairs, 3.00 pairs/s"


def test_final_lines_say_how_long_it_took_or_where_it_stopped() -> None:
    done = progress_line("train fpn", 600, 600, "steps", 302.0, "loss 0.1234", final=True)
    assert done == "train fpn: 600/600 steps in 5 min 2 s, 1.99 steps/s, loss 0.1234"
    stopped = progress_line("defect-gen", 30, 40, "pairs", 60.0, final=True)
    assert stopped == "defect-gen: stopped at 30/40 pairs after 1 min 0 s, 0.50 pairs/s"


# ---- when lines are written ----------------------------------------------------------------------------


def test_lines_come_at_the_interval_with_counts_and_eta(clock: FakeClock, captured) -> None:
    log, handler = captured
    with progress("pseudo-label", 247, log=log, interval_s=30, clock=clock, terminal=False) as bar:
        for _ in range(247):
            clock.now += 1.25  # 0.8 images/s
            bar.advance()
    times = [t for t, _ in handler.lines]
    lines = [line for _, line in handler.lines]
    assert lines[0] == "pseudo-label: 0/247 images"
    assert lines[-1] == "pseudo-label: 247/247 images in 5 min 9 s, 0.80 images/s"
    periodic = lines[1:-1]
    # 308.75 s of work, a line at most every 30 s: 10 of them (the 247th item ends the run instead).
    assert len(periodic) == 10
    assert periodic[0] == "pseudo-label: 24/247 images, 0.80 images/s, ETA 4 min 39 s"
    assert all(re.fullmatch(r"pseudo-label: \d+/247 images, 0\.80 images/s, ETA .+", p) for p in periodic)
    assert min(np.diff(times[:-1])) >= 30


def test_no_line_more_often_than_the_interval_however_fast_the_items(clock: FakeClock, captured) -> None:
    log, handler = captured
    with progress("train", 100_000, "steps", log=log, interval_s=30, clock=clock, terminal=False) as bar:
        for _ in range(100_000):
            clock.now += 0.001
            bar.advance()
    periodic = handler.lines[1:-1]
    assert len(periodic) == 3  # 100 s of steps: at 30, 60 and 90 s
    assert min(np.diff([t for t, _ in handler.lines[:-1]])) >= 30


def test_a_slow_item_gets_its_line_as_soon_as_it_is_done(clock: FakeClock, captured) -> None:
    log, handler = captured
    with progress("teacher scoring", 3, log=log, interval_s=30, clock=clock, terminal=False) as bar:
        clock.now += 95
        bar.advance()
        clock.now += 95
        bar.advance()
        clock.now += 95
        bar.advance()
    assert [line for _, line in handler.lines] == [
        "teacher scoring: 0/3 images",
        "teacher scoring: 1/3 images, 0.011 images/s, ETA 3 min 10 s",
        "teacher scoring: 2/3 images, 0.011 images/s, ETA 1 min 35 s",
        "teacher scoring: 3/3 images in 4 min 45 s, 0.011 images/s",
    ]


def test_note_and_set_completed(clock: FakeClock, captured) -> None:
    log, handler = captured
    with progress("defect-gen stain", 40, "pairs", log=log, interval_s=0, clock=clock, terminal=False) as bar:
        clock.now += 10
        bar.set_completed(12, note="16 sampled")
    assert handler.lines[1][1] == "defect-gen stain: 12/40 pairs, 1.20 pairs/s, ETA 23 s, 16 sampled"
    assert (
        handler.lines[-1][1]
        == "defect-gen stain: stopped at 12/40 pairs after 10 s, 1.20 pairs/s, 16 sampled"
    )


def test_a_failure_is_named_in_the_last_line(clock: FakeClock, captured) -> None:
    log, handler = captured
    with pytest.raises(ValueError), progress("evaluate", 10, log=log, clock=clock, terminal=False) as bar:
        bar.advance()
        clock.now += 2
        raise ValueError("bad image")
    assert handler.lines[-1][1] == "evaluate: stopped at 1/10 images after 2.0 s, 0.50 images/s (ValueError)"


def test_track_counts_each_item_once_the_body_is_done(clock: FakeClock, captured) -> None:
    log, handler = captured
    seen = []
    for item in track(["a", "b", "c", "d"], "writing", log=log, interval_s=0, clock=clock, terminal=False):
        clock.now += 1
        seen.append(item)
    assert seen == ["a", "b", "c", "d"]
    assert [line for _, line in handler.lines][1:] == [
        "writing: 1/4 images, 1.00 images/s, ETA 3.0 s",
        "writing: 2/4 images, 1.00 images/s, ETA 2.0 s",
        "writing: 3/4 images, 1.00 images/s, ETA 1.0 s",
        "writing: 4/4 images in 4.0 s, 1.00 images/s",
    ]


def test_track_left_early_says_where_it_stopped(clock: FakeClock, captured) -> None:
    log, handler = captured
    for index in track(range(10), "steps", 10, "steps", log=log, interval_s=30, clock=clock, terminal=False):
        clock.now += 1
        if index == 2:
            break
    assert handler.lines[-1][1] == "steps: stopped at 2/10 steps after 3.0 s, 0.67 steps/s"


@pytest.mark.parametrize("total", [0, 1])
def test_nothing_is_said_about_zero_or_one_item(total: int, clock: FakeClock, captured) -> None:
    log, handler = captured
    with progress("teacher predict", total, log=log, interval_s=0, clock=clock, terminal=False) as bar:
        bar.advance(total)
    assert handler.lines == []


def test_the_environment_sets_the_interval(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock, captured
) -> None:
    log, handler = captured
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "5")
    with progress("x", 100, log=log, clock=clock, terminal=False) as bar:
        for _ in range(100):
            clock.now += 1
            bar.advance()
    assert len(handler.lines) == 2 + 19  # start, every 5 s up to 95 s, end


def test_on_a_terminal_a_bar_instead_of_lines(clock: FakeClock, captured) -> None:
    log, handler = captured
    # Nested bars share one live display (rich refuses a second one).
    with progress("outer", 3, log=log, clock=clock, terminal=True) as outer:
        for _ in range(3):
            with progress("inner", 2, log=log, clock=clock, terminal=True) as inner:
                inner.advance(2)
            outer.advance()
    assert handler.lines == []
    assert progress_module._BAR._display is None  # stopped once the outer bar ended


def test_inside_a_prefect_run_lines_go_to_its_logger_and_no_bar_is_drawn(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock, captured
) -> None:
    log, handler = captured
    monkeypatch.setattr(progress_module, "_prefect_run_logger", lambda: log)
    with progress("train fpn", 4, "steps", interval_s=0, clock=clock, terminal=True) as bar:
        clock.now += 2
        bar.advance(note="loss 0.5000")
        assert progress_module._BAR._display is None
    assert handler.lines[1][1] == "train fpn: 1/4 steps, 0.50 steps/s, ETA 6.0 s, loss 0.5000"


def test_without_prefect_loaded_no_run_logger_is_looked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "prefect", raising=False)
    assert progress_module._prefect_run_logger() is None


# ---- the loops that report -----------------------------------------------------------------------------


def _tiny_training() -> tuple[dict, list, torch.Tensor]:
    """A two-epoch training of one convolution: its weights, its history and the next random draw."""
    rng = np.random.default_rng(3)
    samples = [
        (
            rng.integers(0, 255, (20, 20, 3), dtype=np.uint8),
            (rng.random((20, 20)) > 0.9).astype(np.uint8),
            1.0,
        )
        for _ in range(4)
    ]
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 2, 3, padding=1)
    config = TrainConfig(epochs=2, batch_size=2, image_size=16, freeze_backbone_epochs=0)
    history = train_segmenter(model, samples, config)
    return model.state_dict(), history, torch.rand(3)


def test_training_reports_steps_with_the_loss_and_computes_the_same(
    monkeypatch: pytest.MonkeyPatch, progress_lines: list[str]
) -> None:
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "0")
    monkeypatch.setattr(progress_module, "_stderr_is_terminal", lambda: False)
    logged = _tiny_training()
    lines = list(progress_lines)
    assert lines[0] == "train Conv2d: 0/4 steps"
    assert re.fullmatch(r"train Conv2d: 1/4 steps, .+ steps/s, ETA .+, epoch 1/2, loss \d+\.\d{4}", lines[1])
    assert re.fullmatch(r"train Conv2d: 4/4 steps in .+, epoch 2/2, loss \d+\.\d{4}", lines[-1])
    monkeypatch.setattr(progress_module, "_stderr_is_terminal", lambda: True)
    drawn = _tiny_training()
    # Reporting draws no random number and changes no computation: same weights, losses and RNG state after.
    assert all(torch.equal(logged[0][k], drawn[0][k]) for k in logged[0])
    assert [h["loss"] for h in logged[1]] == [h["loss"] for h in drawn[1]]
    assert torch.equal(logged[2], drawn[2])


def test_cli_pseudo_label_writes_progress_lines_off_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, progress_lines: list[str]
) -> None:
    for seed in range(4):
        write_png(tmp_path / "pool" / f"p{seed}.png", render_sample(seed, 48, 48, defect_prob=0.5).image)
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(
        app,
        ["pseudo-label", str(tmp_path / "pool"), "--out", str(tmp_path / "out"), "--teacher", "backbone",
         "--workspace", str(tmp_path / "ws")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = list(progress_lines)
    for stage in ("teacher features", "teacher scoring", "teacher predict", "pseudo-label writing"):
        assert f"{stage}: 0/4 images" in lines
        assert any(re.fullmatch(rf"{stage}: 2/4 images, .+ images/s, ETA .+", line) for line in lines)
        assert any(re.fullmatch(rf"{stage}: 4/4 images in .+ s, .+ images/s", line) for line in lines)
    assert (tmp_path / "out" / "scores.csv").is_file()
