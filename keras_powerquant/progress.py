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
