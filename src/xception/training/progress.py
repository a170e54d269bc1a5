"""Training progress on stderr. On a terminal, a live bar. In a file or a CI log, where
every redraw of a bar is one more line (about 1,700 for the default job), a plain line at
most every ``interval`` seconds. Epoch results get a line either way."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    def __init__(
        self,
        total: int,
        initial: int,
        enabled: bool,
        stream: TextIO | None = None,
        interval: float = 60.0,
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled, self.total, self.step, self.interval = enabled, total, initial, interval
        self.live = enabled and self.stream.isatty()
        self.bar = (
            tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream)
            if self.live
            else None
        )
        self.last_line = time.monotonic()
        self.figures: dict[str, str] = {}

    def update(self, step: int, loss: float | None, images_per_second: float | None) -> None:
        """Training reached ``step``; ``loss`` and the rate, when given, are shown until
        newer ones come."""
        advanced, self.step = step - self.step, step
        if loss is not None:
            self.figures["loss"] = f"{loss:.3f}"
        if images_per_second is not None:
            self.figures["img/s"] = f"{images_per_second:.0f}"
        if self.bar is not None:
            self.bar.update(advanced)
            if loss is not None or images_per_second is not None:
                self.bar.set_postfix(self.figures, refresh=False)
        elif self.enabled and time.monotonic() - self.last_line >= self.interval:
            shown = "".join(f" {key} {value}" for key, value in self.figures.items())
            self.line(f"step {step}/{self.total} ({step / max(self.total, 1):.0%}){shown}")

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)
        self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
