"""The token cache's build progress on the console (token_cache.BuildProgress): a bar with an ETA
on a terminal; elsewhere a plain line every few seconds."""

from __future__ import annotations

import sys
import time

import tqdm

_LINE_EVERY_S = 5.0  # Seconds between progress lines when stdout is not a terminal.


class TokenizingProgress:
    """Shows one build at a time; start() begins the next."""

    def __init__(self):
        self.total, self.unit = 0, 'B'
        self.done = self.tokens = 0
        self.start_time = self.last_line = time.time()
        self.bar = None

    def start(self, total: int, unit: str) -> None:
        self.total, self.unit = total, unit
        self.done = self.tokens = 0
        self.start_time = self.last_line = time.time()
        self.bar = (
            tqdm.tqdm(
                total=total or None,
                unit=unit,
                unit_scale=True,
                desc='Tokenizing',
                dynamic_ncols=True,
            )
            if sys.stdout.isatty()
            else None
        )

    def elapsed(self) -> float:
        return time.time() - self.start_time

    def update(self, done: int, tokens: int) -> None:
        self.done += done
        self.tokens += tokens
        rate = self.tokens / max(self.elapsed(), 1e-9)
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_postfix_str(f'{self.tokens:,} tokens, {rate:,.0f} tokens/s', refresh=False)
        elif time.time() - self.last_line >= _LINE_EVERY_S:
            self.last_line = time.time()
            print(
                f'Tokenizing: {self._amount()}, {self.tokens:,} tokens, {rate:,.0f} tokens/s'
                f'{self._eta()}',
                flush=True,
            )

    def _amount(self) -> str:
        scale = (lambda n: f'{n / 1e6:,.1f} MB') if self.unit == 'B' else (lambda n: f'{n:,}')
        if not self.total:
            return f'{scale(self.done)} {"" if self.unit == "B" else self.unit}'.strip()
        return f'{scale(self.done)} of {scale(self.total)} ({100 * self.done / self.total:.0f}%)'

    def _eta(self) -> str:
        if not self.total or not self.done:
            return ''
        left = self.elapsed() * max(self.total - self.done, 0) / self.done
        return f', ETA {int(left) // 60}m {int(left) % 60:02d}s'

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def on_main(is_main: bool) -> TokenizingProgress | None:
    """The progress of a build, shown by process 0 only."""
    return TokenizingProgress() if is_main else None
