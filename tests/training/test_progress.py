"""Progress: a live bar on a terminal, plain lines in a file or CI log."""

import io

from xception.training.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_timed_lines_and_epoch_lines_only():
    stream = io.StringIO()
    progress = Progress(total=100, initial=0, enabled=True, stream=stream, interval=3600)
    for step in range(1, 101):
        progress.update(step, 0.5, 700.0)
    progress.line("epoch 1.00 step 100: val_top1 0.9")
    progress.close()
    assert stream.getvalue() == "epoch 1.00 step 100: val_top1 0.9\n"
    timed = io.StringIO()
    progress = Progress(total=10, initial=0, enabled=True, stream=timed, interval=0)
    progress.update(5, 1.25, 700.0)
    progress.update(6, None, None)
    assert timed.getvalue().splitlines() == [
        "step 5/10 (50%) loss 1.250 img/s 700",
        "step 6/10 (60%) loss 1.250 img/s 700",  # the latest figures stand
    ]
    assert "\r" not in timed.getvalue()


def test_a_terminal_gets_a_bar_and_disabled_progress_prints_nothing():
    terminal = Terminal()
    progress = Progress(total=10, initial=2, enabled=True, stream=terminal)
    progress.update(5, 0.75, 100.0)
    progress.line("epoch 1.00")
    progress.close()
    assert "\r" in terminal.getvalue() and "5/10" in terminal.getvalue()
    assert "epoch 1.00" in terminal.getvalue()
    quiet = Terminal()
    progress = Progress(total=10, initial=0, enabled=False, stream=quiet, interval=0)
    progress.update(5, 0.75, 100.0)
    progress.line("epoch 1.00")
    progress.close()
    assert quiet.getvalue() == ""
