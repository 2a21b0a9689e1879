"""Progress bars: a handful of lines per bar in a log file, tqdm's own redraws on a terminal."""

import io
import itertools
import re
from pathlib import Path

import tqdm.std

from tipcap.progress import LOG_LINES, progress_bar

PACKAGE = Path(__file__).parent.parent / "tipcap"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def slow_clock(monkeypatch) -> None:
    """Every reading of tqdm's clock is half a second after the previous one, as in a slow loop."""
    clock = itertools.count(step=0.5)
    monkeypatch.setattr(tqdm.std, "time", lambda: next(clock))


def written_lines(stream: io.StringIO) -> list[str]:
    return [line for line in re.split(r"[\r\n]", stream.getvalue()) if line.strip()]


def test_a_bar_written_to_a_log_prints_a_few_lines_and_its_completion(monkeypatch):
    slow_clock(monkeypatch)
    stream = io.StringIO()
    bar = progress_bar(total=10_000, file=stream, desc="work", unit="step")
    for step in range(10_000):
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    bar.close()
    lines = written_lines(stream)
    assert len(lines) <= LOG_LINES + 5, len(lines)
    assert lines[-1].startswith("work: 100%") and "10000/10000" in lines[-1]


def test_an_iterated_bar_in_a_log_counts_out_its_length(monkeypatch):
    slow_clock(monkeypatch)
    stream = io.StringIO()
    assert sum(progress_bar(range(10_000), file=stream, desc="rows")) == sum(range(10_000))
    lines = written_lines(stream)
    assert len(lines) <= LOG_LINES + 5, len(lines)
    assert lines[-1].startswith("rows: 100%") and "10000/10000" in lines[-1]


def test_a_bar_on_a_terminal_redraws_as_tqdm_does(monkeypatch):
    slow_clock(monkeypatch)
    stream = Terminal()
    bar = progress_bar(total=1000, file=stream)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert len(written_lines(stream)) > 900


def test_a_disabled_bar_writes_nothing():
    stream = io.StringIO()
    bar = progress_bar(total=100, file=stream, disable=True)
    bar.update(100)
    bar.close()
    assert stream.getvalue() == ""


def test_every_bar_of_the_package_goes_through_progress_bar():
    direct = [
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name != "progress.py" and re.search(r"\btqdm\(", path.read_text(encoding="utf-8"))
    ]
    assert direct == []
