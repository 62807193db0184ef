"""A fake clock, so that timed code runs on known times."""


class Clock:
    """Each reading returns the next of `times`; once they are spent, the last reading advanced
    by `step` seconds, or, with step None, a failure: a reading the test did not expect.
    Callable (for a `now` or `clock` argument) and also a stand-in for the time module's
    perf_counter and monotonic. `readings` counts the readings."""

    def __init__(self, times=(), step: float | None = None):
        self._times, self._step = iter(times), step
        self.now, self.readings = 0.0, 0

    def __call__(self) -> float:
        self.readings += 1
        following = next(self._times, None)
        if following is None:
            assert self._step is not None, f'the clock was read {self.readings} times'
            following = self.now + self._step
        self.now = following
        return self.now

    perf_counter = monotonic = __call__
