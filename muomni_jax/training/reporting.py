"""What a run shows while it trains: TensorBoard event files, console progress, a profile, and
with config.wandb_project the same scalars and samples in Weights & Biases.

The training loop owns one `Reporter` and calls it at three points: `advance` after every step
(host-side only: it never waits on the device except at the two profile boundaries),
`write_scalars` when it has logged or validated, and `log` for each line it prints. Only process 0
writes anything; on the others every method does nothing.

Layout under save_dir, as TensorBoard expects with `tensorboard --logdir SAVE_DIR`:
  events.out.tfevents.*           scalars ('train/...', 'val/...') and text summaries
  plugins/profile/<time>/         a jax.profiler trace of config.profile_steps, with
                                  perfetto_trace.json.gz for https://ui.perfetto.dev
W&B gets one run per launch, grouped by save_dir, under the same tags; wandb is imported only
when a project is set (it is optional, and slow to import).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import tqdm

from muomni_jax.errors import UserError
from muomni_jax.io import run_dir
from muomni_jax.training import event_writer

# Record fields that are bookkeeping (TensorBoard keeps wall time itself), not measurements.
_NOT_SCALARS = frozenset({'step', 'epoch', 'elapsed_s'})


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """'start,end' -> (start, end), the first and last step to trace; '' -> None (no profile)."""
    if not text.strip():
        return None
    parts = text.split(',')
    try:
        start, end = (int(p) for p in parts)
    except ValueError:
        start = end = -1
    if len(parts) != 2 or not 1 <= start <= end:
        raise UserError(
            f'profile_steps {text!r} must be "start,end" with 1 <= start <= end, '
            'e.g. --config.profile_steps=10,20'
        )
    return start, end


def scalar_tag(name: str) -> str:
    """TensorBoard tag of a training_log.json field: 'val_loss' -> 'val/loss', 'lr' -> 'train/lr',
    'epochs/wiki' -> 'train/epochs/wiki', 'val/wiki/loss' as it is.
    """
    if name.startswith('val_'):
        return 'val/' + name[len('val_') :]
    if name.startswith('val/'):  # A mixture source's: 'val/wiki/loss'.
        return name
    return 'train/' + name


class Reporter:
    """TensorBoard writer, progress display and profiler of one run (see the module docstring)."""

    def __init__(
        self,
        save_dir: str,
        *,
        total_steps: int,
        start_step: int,
        profile_steps: tuple[int, int] | None = None,
        enabled: bool = True,
        stream: TextIO | None = None,
        wandb_project: str = '',
        run_config: Mapping[str, Any] | None = None,
    ):
        """Opens the event writer and, when `stream` is a terminal, the progress bar.

        Args:
          save_dir: The run's directory; event files and the profile go directly under it.
          total_steps: Step the run ends at (max_steps or the end of the epochs): the bar's 100%.
          start_step: Steps already done (a resumed run), so the ETA counts only what is left.
          profile_steps: (start, end) to trace with jax.profiler, or None.
          enabled: False on processes other than 0: nothing is written or printed.
          stream: Where lines and the bar go; sys.stdout by default.
          wandb_project: W&B project to log to as well; '' for none.
          run_config: The run's config, shown with the W&B run.
        """
        self.save_dir = save_dir
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stdout
        self._profile_steps = profile_steps if enabled else None
        self._profiling = False
        self._traced_from = self._last_step = start_step
        self._writer = None
        self._wandb_run = None
        self._bar = None
        if not enabled:
            return
        self._writer = event_writer.EventWriter(save_dir)
        if wandb_project:
            self._wandb_run = _start_wandb(wandb_project, save_dir, run_config)
        if _is_terminal(self._stream):
            # tqdm puts ', ' before the postfix: the loss and tokens/s of the last log interval.
            self._bar = tqdm.tqdm(
                total=total_steps,
                initial=start_step,
                file=self._stream,
                dynamic_ncols=True,
                bar_format='Step {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed, ETA {remaining}'
                '{postfix}',
            )
        # A resumed run may start inside the profiled range: trace from its first step.
        self._maybe_start_profile(start_step + 1, None)

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length changed (fitted to schedule_seconds): the bar's 100% follows."""
        if self._bar is not None:
            self._bar.total = total_steps
            self._bar.refresh()

    @property
    def profile_dir(self) -> str:
        """Where jax.profiler puts each trace (one <time>/ folder per trace)."""
        return run_dir.profile_dir(self.save_dir)

    def log(self, message: str) -> None:
        """Prints one line; on a terminal it goes above the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._stream)
        else:
            print(message, file=self._stream, flush=True)

    def advance(self, step: int, state: Any) -> None:
        """Called after each step (`step` updates done, `state` its output): moves the bar and
        starts or stops the profile at its boundaries, waiting on `state` only there."""
        if not self.enabled:
            return
        self._last_step = step
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        if self._profiling and step >= self._profile_steps[1]:
            jax.block_until_ready(state)  # Steps run asynchronously: let the last one finish.
            self._stop_profile()
        self._maybe_start_profile(step + 1, state)

    def write_scalars(self, step: int, record: Mapping[str, Any]) -> None:
        """Writes every numeric field of a training_log.json record (see `scalar_tag`)."""
        if not self.enabled:
            return
        scalars = {
            scalar_tag(k): v
            for k, v in record.items()
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        self._writer.write_scalars(step, scalars)
        self._writer.flush()  # Readers see each log interval at once, not every 2 minutes.
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)
        if self._bar is not None and 'loss' in record:
            postfix = f'loss={record["loss"]:.3f}'
            if 'tokens_per_s' in record:
                postfix += f', {record["tokens_per_s"]:,.0f} tok/s'
            self._bar.set_postfix_str(postfix, refresh=True)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes text summaries, e.g. {'samples/0': generated text}: TensorBoard's Text tab."""
        if not self.enabled:
            return
        self._writer.write_texts(step, texts)
        self._writer.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(dict(texts), step=step)

    def close(self) -> None:
        """Stops an unfinished profile, flushes the event file and ends the bar. Safe to repeat."""
        if self._profiling:  # The run ended (or failed) inside the profiled steps.
            self._stop_profile()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def _maybe_start_profile(self, next_step: int, state: Any) -> None:
        if (
            self._profile_steps is None
            or self._profiling
            or not self._profile_steps[0] <= next_step <= self._profile_steps[1]
        ):
            return
        if state is not None:
            jax.block_until_ready(state)  # Keep earlier steps' device work out of the trace.
        os.makedirs(self.profile_dir, exist_ok=True)
        # The Perfetto file opens at ui.perfetto.dev without TensorBoard's profile plugin.
        jax.profiler.start_trace(self.save_dir, create_perfetto_trace=True)
        self._profiling = True
        self._traced_from = next_step
        self.log(f'Profiling steps {next_step}-{self._profile_steps[1]}...')

    def _stop_profile(self) -> None:
        jax.profiler.stop_trace()
        self._profiling = False
        newest = max(os.listdir(self.profile_dir))  # jax names each trace by its start time.
        self.log(
            f'Profile of steps {self._traced_from}-{self._last_step} written to '
            f'{os.path.join(self.profile_dir, newest)}'
        )


def check_wandb_installed(project: str) -> None:
    """A set wandb_project needs the optional wandb package; checked without importing it."""
    if project and importlib.util.find_spec('wandb') is None:
        raise UserError(
            f'wandb_project {project!r} needs the wandb package: pip install '
            'wandb==0.31.0, or leave --config.wandb_project empty'
        )


def _start_wandb(project: str, save_dir: str, run_config: Mapping[str, Any] | None) -> Any:
    import wandb

    name = save_dir.rstrip('/').rsplit('/', 1)[-1]
    # WANDB_MODE, WANDB_DIR and the API key come from the environment, as W&B documents.
    return wandb.init(project=project, name=name, group=save_dir, config=dict(run_config or {}))


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, 'isatty', None)
    return bool(isatty and isatty())
