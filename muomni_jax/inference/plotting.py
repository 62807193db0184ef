"""Training curves from training_log.json: loss and perplexity against step and tokens seen.

`plot_runs` is what `python -m launch.plot` and a notebook both call. It draws on a bare
matplotlib Figure with the Agg canvas, so it never touches pyplot's global state or a display.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

from etils import epath
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from muomni_jax.errors import UserError
from muomni_jax.io import run_dir, storage
from muomni_jax.io.atomic_write import write_atomically

FIGURE_SIZE_INCHES = (12.0, 8.0)
DPI = 100  # So a saved PNG is 1200 x 800 pixels.


def load_run(checkpoint_dir: str) -> list[dict[str, Any]]:
    """Reads checkpoint_dir/training_log.json and gives every record a 'tokens' field.

    Logs written before the 'tokens' field existed get step * batch_size * ctx_len from the
    run's config.json; validation-only records get the same tokens per step as the others.
    """
    path = epath.Path(run_dir.training_log_path(checkpoint_dir))  # Also on gs://.
    if not path.is_file():
        raise UserError(
            f'{path} does not exist: point --checkpoint_dir at the save_dir of a run '
            'that has logged at least one step'
        )
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f'{path} is not valid JSON ({e}): is it a training_log.json?') from None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get('step'), int) for r in records
    ):
        raise UserError(
            f'{path} is not a training log (a list of records with a "step"): '
            'point --checkpoint_dir at a save_dir written by launch.stage_a'
        )
    if not records:
        raise UserError(f'{path} holds no records yet: wait for the first log_every steps')
    tokens_per_step = _tokens_per_step(checkpoint_dir, records)
    return [{'tokens': r['step'] * tokens_per_step, **r} for r in records]


def _tokens_per_step(checkpoint_dir: str, records: list[dict[str, Any]]) -> int:
    for record in records:
        if 'tokens' in record and record['step']:
            return record['tokens'] // record['step']
    try:
        config = (
            run_dir.read_config(
                checkpoint_dir,
                if_damaged='cannot plot against tokens seen without batch_size and ctx_len',
            )
            or {}
        )
        return int(config['batch_size']) * int(config['ctx_len'])
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f'{checkpoint_dir} has neither "tokens" in its training log nor a '
            'config.json with batch_size and ctx_len: cannot plot against tokens '
            'seen'
        ) from None


def _run_labels(checkpoint_dirs: Sequence[str]) -> list[str]:
    """The folder name of each run, or the whole path where two runs share a folder name."""
    names = [os.path.basename(os.path.normpath(d)) for d in checkpoint_dirs]
    return [
        n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, checkpoint_dirs)
    ]


# Markers of a mixture's per-source validation curves, one per source.
_SOURCE_MARKERS = ('s', '^', 'v', 'D', 'P', 'X', '*')


def _series(records: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(key prefix, legend text, line style) of each curve: train, validation and, for a
    mixture, the validation of each source (keys val/<name>/loss and val/<name>/ppl)."""
    names = list(
        dict.fromkeys(
            key.split('/')[1]
            for r in records
            for key in r
            if key.startswith('val/') and key.count('/') == 2
        )
    )
    return [
        ('', 'train', dict(linestyle='-')),
        ('val_', 'validation', dict(linestyle='--', marker='o', markersize=4)),
        *(
            (
                f'val/{name}/',
                f'validation {name}',
                dict(linestyle=':', marker=_SOURCE_MARKERS[i % len(_SOURCE_MARKERS)], markersize=4),
            )
            for i, name in enumerate(names)
        ),
    ]


def plot_runs(checkpoint_dirs: Sequence[str], output_path: str | None = None) -> Figure:
    """Draws loss and perplexity of one or more runs, against step (left) and tokens (right).

    Training curves are solid lines, validation dashed with markers, and a mixture's validation
    per source dotted with a marker per source; each run has one colour.

    Args:
      checkpoint_dirs: save_dirs of runs, each holding a training_log.json.
      output_path: When given, the figure is written there as a PNG of 1200 x 800 pixels.
    Returns:
      The matplotlib Figure (a notebook displays it as it is).
    """
    if not checkpoint_dirs:
        raise UserError('no run to plot: give at least one --checkpoint_dir')
    runs = [load_run(d) for d in checkpoint_dirs]
    fig = Figure(figsize=FIGURE_SIZE_INCHES, dpi=DPI, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex='col')
    for index, (label, records) in enumerate(zip(_run_labels(checkpoint_dirs), runs)):
        colour = f'C{index % 10}'
        for column, x_key in enumerate(('step', 'tokens')):
            for row, metric in enumerate(('loss', 'ppl')):
                ax = axes[row, column]
                for prefix, kind, style in _series(records):
                    points = [
                        (r[x_key], r[prefix + metric]) for r in records if prefix + metric in r
                    ]
                    if points:
                        xs, ys = zip(*points)
                        ax.plot(xs, ys, color=colour, label=f'{label} {kind}', **style)
    for column, x_label in enumerate(('step', 'tokens seen')):
        axes[0, column].set_title(f'against {x_label}')
        axes[0, column].set_ylabel('loss (nats/token)')
        axes[1, column].set_ylabel('perplexity (log scale)')
        axes[1, column].set_yscale('log')
        # Plain numbers (250, 1k) rather than powers of ten on the perplexity axis.
        axes[1, column].yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axes[1, column].yaxis.set_major_formatter(ticker.EngFormatter(sep=''))
        axes[1, column].yaxis.set_minor_formatter(ticker.NullFormatter())
        axes[1, column].set_xlabel(x_label)
        for row in range(2):
            axes[row, column].grid(True, which='both', alpha=0.3)
    axes[1, 1].xaxis.set_major_formatter(ticker.EngFormatter(sep=''))  # 200k, 1.5M tokens.
    axes[0, 0].legend(fontsize='small')
    fig.suptitle('Stage A: ' + ', '.join(_run_labels(checkpoint_dirs)))
    if output_path:
        _save(fig, output_path)
    return fig


def _save(fig: Figure, output_path: str) -> None:
    if storage.is_url(output_path):  # launch.plot's default beside a gs:// run.
        png = io.BytesIO()
        fig.savefig(png, format='png', dpi=DPI)
        write_atomically(output_path, png.getvalue())
        return
    directory = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(directory):
        raise UserError(f'cannot write {output_path}: folder {directory} does not exist')
    try:
        fig.savefig(output_path, format='png', dpi=DPI)
    except OSError as e:
        raise UserError(
            f'cannot write {output_path} ({e.strerror}): choose another --output'
        ) from None
