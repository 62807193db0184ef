"""Weighted mixtures: parsing, the row assignment, the batches, per-source validation and resume.

The bad mixture strings are in test_bad_inputs.py; two processes against one in
test_multiprocess.py.
"""

import collections
import shutil

import numpy as np
import pytest

import muomni_jax
from muomni_jax.data import host_data, input_pipeline, mixture, tokenizer_setup
from muomni_jax.data import tokenizer as tokenizer_lib
from muomni_jax.errors import UserError
from muomni_jax.inference import evaluation, plotting
from muomni_jax.training import run_plan, train
from tests.support.checkpoints import restore_state
from tests.support.configs import mixture_spec, small_config
from tests.support.logs import log_without_timing, read_events
from tests.support.trees import assert_trees_equal


def test_parse_normalizes_weights_and_reads_tfds_sources():
    sources = mixture.parse('wiki=data/wiki/*.txt:3, books=tfds:wiki40b/en/train/text:1')
    assert [s.name for s in sources] == ['wiki', 'books']
    assert [s.weight for s in sources] == [0.75, 0.25]
    assert sources[0].data_path == 'data/wiki/*.txt' and not sources[0].tfds_name
    assert (sources[1].tfds_name, sources[1].tfds_split, sources[1].tfds_text_key) == (
        'wiki40b/en',
        'train',
        'text',
    )
    # A path may hold ':' and '='; the weight is what follows the last ':'.
    [source] = mixture.parse('web=gs://bucket/a=b/*.txt:1')
    assert source.data_path == 'gs://bucket/a=b/*.txt'


@pytest.mark.parametrize(
    'spec, expected',
    [
        ('a=x.txt:1,', 'has an empty entry'),
        ('a x.txt:1', 'does not parse'),
        ('a.b=x.txt:1', "mixture source name 'a.b' must be letters, digits, _ or -"),
        ('a=tfds:lm1b/train:1', 'a TFDS source is tfds:DATASET/SPLIT/TEXT_KEY'),
        ('a=x.txt:inf', "mixture source 'a' has weight inf: weights must be > 0"),
        ('a=x.txt:1,b=y.txt:0.0001', 'mixture source(s) b have a weight below 1/4096'),
    ],
)
def test_parse_refuses_bad_strings_in_one_line(spec, expected):
    with pytest.raises(UserError, match='.') as error:
        mixture.parse(spec)
    assert expected in str(error.value) and '\n' not in str(error.value)


def test_block_rows_are_the_weights_by_largest_remainder():
    sources = mixture.parse('a=x:0.5,b=y:0.25,c=z:0.25')
    assert list(mixture.block_rows(sources)) == [2048, 1024, 1024]
    sources = mixture.parse('a=x:1,b=y:1,c=z:1')
    counts = mixture.block_rows(sources)
    assert counts.sum() == mixture.BLOCK_ROWS and list(counts) == [1366, 1365, 1365]


def test_row_assignment_follows_the_weights_draws_each_position_once_and_resumes_anywhere():
    weights = [0.6, 0.3, 0.1]
    counts = mixture.block_rows([mixture.Source(str(i), w) for i, w in enumerate(weights)])
    assignment = mixture.RowAssignment(counts, seed=5)
    rows = 16
    source, position = assignment.rows(0, 700 * rows)  # 700 steps span three blocks.
    shares = np.bincount(source, minlength=3) / len(source)
    np.testing.assert_allclose(shares, weights, atol=0.01)
    # Over every block the counts are exact; per step they vary.
    block = source[: mixture.BLOCK_ROWS]
    assert list(np.bincount(block, minlength=3)) == list(counts)
    per_step = np.stack([np.bincount(s, minlength=3) for s in source.reshape(-1, rows)])
    assert per_step[:, 2].min() == 0 and per_step[:, 2].max() >= 3
    # Each source's rows take its positions 0, 1, 2, ... in order, each once.
    for s in range(3):
        np.testing.assert_array_equal(position[source == s], np.arange((source == s).sum()))
    # Any range, read by a fresh assignment (a resumed run), agrees with the whole.
    fresh = mixture.RowAssignment(counts, seed=5)
    for start, stop in ((4090, 4110), (9000, 9001), (5 * rows, 400 * rows)):
        got = fresh.rows(start, stop)
        np.testing.assert_array_equal(got[0], source[start:stop])
        np.testing.assert_array_equal(got[1], position[start:stop])
        np.testing.assert_array_equal(
            fresh.rows_before(start), np.bincount(source[:start], minlength=3)
        )
    # Another seed, another order; one source, the identity.
    assert not np.array_equal(mixture.RowAssignment(counts, seed=6).rows(0, 4096)[0], block)
    one = mixture.RowAssignment([mixture.BLOCK_ROWS], seed=5)
    np.testing.assert_array_equal(one.rows(100, 9000)[1], np.arange(100, 9000))


def test_the_tokenizer_learns_from_documents_drawn_by_the_weights(tmp_path, two_sources):
    config = small_config(tmp_path / 'run', '', mixture=mixture_spec(two_sources, 0.5, 0.5))
    data = run_plan.resolve(config).data
    train_docs = [list(input_pipeline.documents(data.corpus(s), 'train')) for s in data.sources]
    drawn = list(tokenizer_setup.tokenizer_documents(data))
    # As many documents as the sources hold, half from each: code's repeated, prose's thinned.
    assert abs(len(drawn) - sum(map(len, train_docs))) < 0.05 * len(drawn)
    code = set(train_docs[1])
    share = sum(doc in code for doc in drawn) / len(drawn)
    assert abs(share - 0.5) < 0.05 and len(code) / sum(map(len, train_docs)) < 0.3
    assert set(drawn) <= set(train_docs[0]) | code  # Training documents only.
    # A single source is every training document, in order, once.
    config.mixture = ''
    config.data_path = str(two_sources / 'code.txt')
    assert list(tokenizer_setup.tokenizer_documents(run_plan.resolve(config).data)) == train_docs[1]


def _window_counts(stream, ctx_len) -> collections.Counter:
    """How many windows of a stream hold each token tuple (a repeated passage repeats one)."""
    tokens, _ = stream.windows(np.arange(stream.num_windows(ctx_len)), ctx_len)
    return collections.Counter(map(tuple, tokens))


def test_mixture_batches_follow_the_weights_and_repeat_a_source_only_after_its_epoch(
    tmp_path, two_sources
):
    config = small_config(
        tmp_path / 'run',
        '',
        mixture=mixture_spec(two_sources, 0.3, 0.7),
        batch_size=16,
        data_shards=2,
        cache_dir=str(tmp_path / 'cache'),
    )
    plan = run_plan.resolve(config)
    tokenizer = tokenizer_lib.train_tokenizer(
        tokenizer_setup.tokenizer_documents(plan.data), 256, 20000
    )
    data = host_data.load(plan.data, tokenizer, log=lambda line: None)
    windows = [[_window_counts(stream, config.ctx_len) for stream in s.train] for s in data.sources]
    steps = data.steps_per_epoch
    batches = [*data.train_batches(config.seed, 0, 0), *data.train_batches(config.seed, 1, 0)]
    assert len(batches) == 2 * steps
    drawn = {(s, shard): [] for s in range(2) for shard in range(2)}
    for batch in batches:
        for row in range(16):
            shard = row // 8  # Shard 0 fills rows 0-7, shard 1 rows 8-15.
            window = tuple(np.append(batch['inputs'][row], batch['targets'][row, -1]))
            hits = [s for s in range(2) if window in windows[s][shard]]
            assert len(hits) == 1  # Every row is a window of one source's own shard.
            drawn[hits[0], shard].append(window)
    epochs = data.source_epochs(2 * steps, config.seed)
    for shard in range(2):
        share = len(drawn[1, shard]) / (len(drawn[0, shard]) + len(drawn[1, shard]))
        assert abs(share - 0.7) < 0.02
        for s, source in enumerate(data.sources):
            rows, size = drawn[s, shard], source.epoch_windows
            assert epochs[source.source.name] == len(rows) / size
            # Each epoch of a source reads `size` distinct windows; repeats wait for the next.
            for epoch in range(len(rows) // size):
                assert (
                    collections.Counter(rows[epoch * size : (epoch + 1) * size])
                    <= (windows[s][shard])
                )
        assert not collections.Counter(drawn[1, shard]) <= windows[1][shard]  # code repeated.
    # code is the smaller source and the heavier: it runs through epochs faster.
    assert epochs['code'] > 3 > epochs['prose'] > 0.5
    # A resume at any step of any epoch gives the same batches.
    for epoch, start in ((0, steps // 2), (0, steps - 1), (1, 3)):
        resumed = next(data.train_batches(config.seed, epoch, start))
        expected = batches[epoch * steps + start]
        for key in expected:
            np.testing.assert_array_equal(resumed[key], expected[key])


@pytest.mark.slow  # Two trainings.
def test_a_mixture_of_one_source_trains_exactly_like_data_path(tmp_path, corpus_sample):
    train.train_and_evaluate(small_config(tmp_path / 'plain', corpus_sample))
    train.train_and_evaluate(
        small_config(tmp_path / 'mixture', '', mixture=f'only={corpus_sample}:2.5')
    )
    per_source = ('epochs/only', 'val/only/loss', 'val/only/ppl')
    plain, mixed = log_without_timing(tmp_path / 'plain'), log_without_timing(tmp_path / 'mixture')
    assert plain == log_without_timing(tmp_path / 'mixture', drop=per_source)
    finals = [r for r in mixed if 'val_loss' in r]
    assert finals and all(r['val/only/loss'] == r['val_loss'] for r in finals)
    assert (tmp_path / 'plain' / 'tokenizer.model').read_bytes() == (
        tmp_path / 'mixture' / 'tokenizer.model'
    ).read_bytes()


@pytest.mark.slow  # A training, then each source scored.
def test_validation_per_source_equals_evaluate_on_its_held_out_text(tmp_path, two_sources, capsys):
    """Each source's validation loss is what evaluation.evaluate_text (launch.evaluate's
    scoring, whose CLI test_use_checkpoint runs) gives on that source's held-out documents."""
    save_dir = tmp_path / 'run'
    config = small_config(
        save_dir,
        '',
        mixture=mixture_spec(two_sources),
        eval_batches=0,
        max_steps=4,
        eval_every=4,
        save_every=4,
        cache_dir=str(tmp_path / 'cache'),
    )
    summary = train.train_and_evaluate(config)
    out = capsys.readouterr().out
    assert 'Loading data from a mixture of 2 sources: prose 70% (' in out
    assert '  code: ' in out and '[code] Token cache: building' in out
    assert '| epochs prose ' in out
    final = log_without_timing(save_dir)[-1]
    assert final['step'] == 4
    checkpoint = muomni_jax.load(str(save_dir))
    for name in ('prose', 'code'):
        held_out = tmp_path / f'{name}_validation.txt'
        data = run_plan.resolve(config).data
        source = next(s for s in data.sources if s.name == name)
        held_out.write_text(
            '\n'.join(input_pipeline.documents(data.corpus(source), 'validation')) + '\n',
            encoding='utf-8',
        )
        # launch.evaluate's default batch_size.
        loss = evaluation.evaluate_text(
            checkpoint.model(), checkpoint.tokenizer, str(held_out), 16
        )['loss']
        assert final[f'val/{name}/loss'] == pytest.approx(loss, abs=1e-4)
        assert f'| {name} loss={final[f"val/{name}/loss"]:.3f}' in out
    weighted = 0.7 * final['val/prose/loss'] + 0.3 * final['val/code/loss']
    assert final['val_loss'] == pytest.approx(weighted, rel=1e-12)
    assert summary['val_loss'] == final['val_loss'] and 'val/code/ppl' in summary
    # TensorBoard has each source's validation and epochs beside the weighted total.
    events = read_events(save_dir)
    for tag in ('val/loss', 'val/prose/loss', 'val/code/ppl', 'train/epochs/code'):
        assert tag in events, sorted(events)
    assert events['val/code/loss'][-1] == (4, pytest.approx(final['val/code/loss'], rel=1e-6))
    # launch.plot draws each source's validation.
    fig = plotting.plot_runs([str(save_dir)])
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ['run train', 'run validation', 'run validation prose', 'run validation code']
    # Resuming with other weights is refused before anything changes.
    config.mixture = mixture_spec(two_sources, 0.5, 0.5)
    config.max_steps = 6
    with pytest.raises(UserError, match='resume with the same --config.mixture'):
        train.train_and_evaluate(config)


@pytest.mark.slow  # Two trainings.
def test_a_mixture_resumes_bitwise(tmp_path, two_sources):
    """A run that resumes from its step-4 checkpoint ends equal to one that did not stop."""
    whole, resumed = tmp_path / 'whole', tmp_path / 'resumed'
    config = small_config(
        whole,
        '',
        mixture=mixture_spec(two_sources),
        max_steps=8,
        save_every=4,
        eval_every=4,
        log_every=3,
        dropout=0.1,
    )
    train.train_and_evaluate(config)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / '8')
    config.save_dir = str(resumed)
    train.train_and_evaluate(config)
    assert log_without_timing(resumed) == log_without_timing(whole)
    assert_trees_equal(restore_state(config, whole, 8), restore_state(config, resumed, 8))
