"""data/fingerprint.py, the train/validation split's hash, against TensorFlow bit for bit.

The split used tf.strings.to_hash_bucket_fast before TensorFlow left the text path; the numpy
FarmHash must give the same buckets, or every corpus would be split anew (and a cache's
validation documents would move into training).
"""

import numpy as np
import pytest

from muomni_jax.data import fingerprint
from tests.support.environment import CORPUS

tf = pytest.importorskip('tensorflow')


def corpus_documents():
    with open(CORPUS, 'rb') as f:
        return [line.strip() for line in f.read().split(b'\n') if line.strip()]


def random_strings():
    """Every length through the short code paths and several 64-byte blocks, and long ones."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in range(300) for _ in range(2)]
    docs += [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1000, 4096, 65_537)]
    return docs + [b'', b'\0', b'\0' * 70, b'\xff' * 65, 'déjà vu – ½'.encode()]


@pytest.mark.parametrize('docs', [corpus_documents(), random_strings()], ids=['corpus', 'random'])
def test_fingerprint64_equals_tensorflow(docs):
    expected = tf.fingerprint(tf.constant(docs)).numpy().view('<u8')[:, 0]
    np.testing.assert_array_equal(fingerprint.fingerprint64(docs), expected)


@pytest.mark.parametrize('buckets', [1_000_000, 2, 2**63 - 1])
def test_hash_buckets_equal_to_hash_bucket_fast(buckets):
    docs = random_strings()
    expected = tf.strings.to_hash_bucket_fast(docs, buckets).numpy()
    np.testing.assert_array_equal(fingerprint.hash_buckets(docs, buckets), expected)


def test_no_documents_and_bad_bucket_counts():
    assert fingerprint.hash_buckets([], 10).shape == (0,)
    with pytest.raises(ValueError, match='num_buckets must be positive'):
        fingerprint.hash_buckets([b'x'], 0)
