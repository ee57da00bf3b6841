"""Time estimates for `convert`'s progress callbacks: `progress(stage, done, total)`.

`StageClock` turns those calls into `(elapsed, eta)` per stage: the rate is
measured from the stage's first report on, so a first item that also
traces a function or warms caches does not inflate the estimate of the
rest; until a second report, the first item's time stands for each.
"""

import time


def format_seconds(seconds):
    """`"42 s"`, `"3 min 05 s"` or `"1 h 02 min"`."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class StageClock:
    """Elapsed time and an estimate of the time left in the current stage.

    Args:
        clock: the time function (seconds), `time.perf_counter` by default.
    """

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._stage = None
        self._last = clock()

    def update(self, stage, done, total):
        """Records a report; returns `(elapsed, eta)` in seconds, `eta` None when unknown.

        A stage begins at the previous report (of any stage), so its first
        item's time is counted. `eta` is None without a total or before
        the first item is done.
        """
        now = self._clock()
        if stage != self._stage:
            self._stage, self._start, self._first = stage, self._last, None
        self._last = now
        elapsed = now - self._start
        if not total or not done:
            return elapsed, None
        if self._first is None or done <= self._first[1]:
            if self._first is None:
                self._first = (now, done)
            rate = elapsed / done
        else:
            rate = (now - self._first[0]) / (done - self._first[1])
        return elapsed, rate * max(total - done, 0)


class ProgressPrinter:
    """A `progress(stage, done, total)` callback printing done/total, elapsed time and ETA per stage.

    With `interactive` (a terminal) one line per stage is rewritten in
    place. Otherwise (a log, a pipe, a notebook) a line is written at the
    stage's first report, then at most every `every` seconds, and when the
    stage completes, each with its estimate.

    Args:
        stream: where lines go (`sys.stderr` for the CLI).
        interactive: rewrite one line per stage in place.
        prefix: text before each line.
        every: seconds between two lines of one stage, when not interactive.
        clock: the time function, as `StageClock`'s.
    """

    def __init__(self, stream, interactive=False, prefix="  ", every=10.0, clock=time.perf_counter):
        self.stream, self.interactive, self.prefix, self.every = stream, interactive, prefix, every
        self._clock = StageClock(clock)
        self._stage = None
        self._logged = 0.0

    def __call__(self, stage, done, total):
        elapsed, eta = self._clock.update(stage, done, total)
        first = stage != self._stage
        if first:
            self.end_line()
            self._stage = stage
        finished = bool(total) and done >= total
        count = f"{done}/{total}" if total else str(done)
        if finished:
            timing = f" in {format_seconds(elapsed)}"
        elif eta is not None:
            timing = f", {format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}"
        else:
            timing = f", {format_seconds(elapsed)} elapsed"
        line = f"{self.prefix}{stage}: {count}{timing}"
        if self.interactive:
            self.stream.write(f"\r{line}\x1b[K")
        elif first or finished or elapsed - self._logged >= self.every:
            self._logged = elapsed
            self.stream.write(line + "\n")
        self.stream.flush()

    def end_line(self):
        """Ends the line being rewritten in place, if any (before other output)."""
        if self.interactive and self._stage is not None:
            self.stream.write("\n")
        self._stage = None
