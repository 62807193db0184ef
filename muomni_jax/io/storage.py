"""Where a run's files live: a local folder or a gs:// bucket.

Every file of a save_dir is reached through etils.epath, Orbax's own path layer, so one code path
serves both. On gs:// three clients do the work (BUILD_NOTES "Checkpoints on gs://"):
  - Orbax's arrays: tensorstore's gcs driver;
  - Orbax's metadata and our own files (config.json, training_log.json, tokenizer.model, the
    TensorBoard event files, gs:// text data): epath, which uses tf.io.gfile when TensorFlow is
    installed, as it is with us (so only runs that touch gs:// import TensorFlow);
  - the bucket's metadata, which Orbax reads with google-cloud-storage; and with it too, the
    copies that set checkpoint steps aside (move_folder).
Other URL schemes are refused: only gs:// is tested.
"""

from __future__ import annotations

import os
import tempfile
import time

from etils import epath

from muomni_jax.errors import UserError

# The write probe of a gs:// save_dir gives up after this long, so a wrong bucket or missing
# credentials fail in seconds, not after the minutes of the clients' default retries.
_PROBE_TIMEOUT_S = 30
_PROBE_RETRIES = {'max_retries': 2, 'initial_delay': '0.2s', 'max_delay': '1s'}


def is_url(path: str) -> bool:
    return '://' in path


def absolute(path: str) -> str:
    """Orbax needs absolute local paths; URLs are absolute already."""
    return path if is_url(path) else os.path.abspath(path)


def check_supported(path: str, field: str) -> None:
    """Refuses URLs other than gs://bucket/..., naming the field."""
    if not is_url(path):
        return
    if not path.startswith('gs://'):
        raise UserError(f'{field} {path}: only local paths and gs:// URLs are supported')
    if not path[len('gs://') :].split('/')[0]:
        raise UserError(f'{field} {path} names no bucket: use gs://BUCKET/FOLDER')


def move_folder(source: str, target: str) -> None:
    """Renames a folder. On gs://, where a folder is a name prefix and TensorFlow's client fails
    to rename one, each object is copied inside the bucket by GCS itself (a rewrite: no bytes
    pass through this machine) and then deleted."""
    if not is_url(source):
        epath.Path(source).rename(target)
        return
    from google.cloud import storage as gcs

    bucket_name, _, source_prefix = source[len('gs://') :].rstrip('/').partition('/')
    target_prefix = target[len('gs://') :].rstrip('/').partition('/')[2]
    bucket = gcs.Client().bucket(bucket_name)
    # Orbax's commit file last: a copy cut short lacks it, so Orbax's clean-up removes the copy,
    # while the source stays whole until every object has been copied.
    blobs = sorted(
        bucket.list_blobs(prefix=source_prefix + '/'),
        key=lambda blob: blob.name.endswith('/commit_success.txt'),
    )
    for blob in blobs:
        copy = bucket.blob(target_prefix + blob.name[len(source_prefix) :])
        token, _, _ = copy.rewrite(blob)
        while token is not None:  # Large objects are copied in several calls.
            token, _, _ = copy.rewrite(blob, token=token)
    for blob in blobs:
        blob.delete()


def check_writable(path: str, field: str = 'save_dir') -> None:
    """Fails unless `path` can be created and written; leaves no trace when it can."""
    check_supported(path, field)
    if is_url(path):
        _check_bucket_writable(path, field)
        return
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(
            f'{field} {path} cannot be created: {existing} is a file, not a '
            f'directory; choose another --config.{field}'
        )
    try:
        # A real write, not os.access: it also catches read-only mounts, and root ignores modes.
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(
            f'{field} {path} is not writable ({existing}: {e.strerror}): choose '
            f'another --config.{field}'
        ) from None


def _check_bucket_writable(url: str, field: str) -> None:
    """Writes and deletes one small object under `url` with tensorstore (the client Orbax writes
    arrays with), then reads the bucket's metadata as Orbax does with google-cloud-storage (to
    learn whether its namespace is hierarchical); each with few retries and a deadline."""
    import tensorstore as ts

    try:
        from google.cloud import storage as gcs
    except ImportError:
        raise UserError(
            f'{field} {url} needs google-cloud-storage, which Orbax uses on gs://: '
            'pip install -r requirements.txt'
        ) from None
    bucket, _, prefix = url[len('gs://') :].partition('/')
    prefix = prefix.rstrip('/') + '/' if prefix.strip('/') else ''
    key = f'.write-test-{os.getpid()}-{time.time_ns()}'
    try:
        store = ts.KvStore.open(
            {'driver': 'gcs', 'bucket': bucket, 'path': prefix},
            context=ts.Context({'gcs_request_retries': _PROBE_RETRIES}),
        ).result(timeout=_PROBE_TIMEOUT_S)
        store.write(key, b'').result(timeout=_PROBE_TIMEOUT_S)
        store.delete_range(ts.KvStore.KeyRange(key, key + '\0')).result(timeout=_PROBE_TIMEOUT_S)
        gcs.Client().get_bucket(bucket, timeout=_PROBE_TIMEOUT_S, retry=None)
    except Exception as e:
        # tensorstore appends the HTTP body in [brackets]; the status before it says enough.
        reason = (str(e).splitlines() or [''])[0].split(' [')[0][:300]
        if isinstance(e, TimeoutError) or not reason:
            reason = f'{type(e).__name__}: no answer within {_PROBE_TIMEOUT_S} s'
        raise UserError(
            f'{field} {url} is not writable ({reason}): check that bucket {bucket} '
            'exists and that this machine may read and write it (on a TPU VM, its '
            'service account; elsewhere `gcloud auth application-default '
            'login`)'
        ) from None
