"""launch.prepare_data: a run's tokenizer and token cache, made ahead of training."""

import jax

from muomni_jax.data import host_data, tokenizer_setup
from muomni_jax.io import storage
from muomni_jax.parallel import distributed
from muomni_jax.training import run_plan, save_dir_lock, tokenizing_progress


def prepare_data(config) -> dict[str, int]:
    """The tokenizer and token cache of a run, without training (launch.prepare_data).

    On one machine with the later run's data_shards it builds every shard, so a pod only opens
    the cache; on every host of a pod it builds each host's own shards. Returns the split totals.
    """
    with distributed.fail_together():
        plan = run_plan.resolve(config)
        storage.check_writable(plan.output.save_dir)
    save_dir = plan.output.save_dir
    is_main = jax.process_index() == 0
    log = print if is_main else (lambda *a, **k: None)
    with save_dir_lock.locked(save_dir, is_main, log):
        tokenizer = tokenizer_setup.shared_tokenizer(plan.data, save_dir)
        data = host_data.load(plan.data, tokenizer, log, tokenizing_progress.on_main(is_main))
        if is_main:  # Last, so a bad input leaves save_dir untouched.
            tokenizer_setup.keep_in_save_dir(save_dir, tokenizer)
    totals = data.totals
    log(
        f'Ready: {totals["train_tokens"]:,} training and {totals["validation_tokens"]:,} '
        f'validation tokens in {plan.data.num_shards} data shard(s); the tokenizer is in '
        f'{save_dir}.'
    )
    return totals
