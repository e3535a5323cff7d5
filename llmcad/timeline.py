"""What ran when: spans (lane, start, end) in `time.perf_counter` seconds, recorded only
while the timeline is on. bench/e2e.py turns it on to draw one verification: layer reads,
the target's pass and its waits for reads, and draft passes in the main thread and in the
background."""

from __future__ import annotations

import time


class Timeline:
    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] | None = None

    def start(self) -> None:
        self.spans = []

    def stop(self) -> list[tuple[str, float, float]]:
        spans, self.spans = self.spans or [], None
        return spans

    def add(self, lane: str, start: float, end: float | None = None) -> None:
        """Record `lane` busy from `start` to `end` (default: now), if the timeline is on."""
        if self.spans is not None:  # list.append is atomic: the reader thread records too
            self.spans.append((lane, start, time.perf_counter() if end is None else end))


TIMELINE = Timeline()
