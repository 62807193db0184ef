"""FarmHash Fingerprint64 in plain numpy, bit-identical to TensorFlow.

`tf.strings.to_hash_bucket_fast(docs, n)` is `Fingerprint64(doc) % n`, and
FarmHash's Fingerprint64 is `farmhashna::Hash64` (a frozen function: its output
is guaranteed never to change). This module re-implements it so that the data
path needs no TensorFlow.

Speed comes from running the arithmetic on many documents at once: documents
are grouped by the length class that picks the code path (0, 1-3, 4-7, 8-16,
17-32, 33-64, >64 bytes), and each 64-bit word the C code reads with `Fetch64`
becomes one gather from the concatenated bytes for the whole group. numpy
uint64 arithmetic on arrays wraps modulo 2**64, exactly like the C code.

Reference: farmhash.cc (google/farmhash), namespace farmhashna.
"""

import numpy as np

__all__ = ['fingerprint64', 'hash_buckets']

_U64 = np.uint64
_MASK = (1 << 64) - 1

# FarmHash's constants.
K0 = _U64(0xC3A5C85C97CB3127)
K1 = _U64(0xB492B66FBE98F273)
K2 = _U64(0x9AE16A3B2F90404F)

# Start state of the >64-byte loop, derived from seed 81 as in the C code;
# computed with Python ints (mod 2**64) so numpy scalars never overflow.
_SEED = 81
_X0 = (_SEED * int(K2)) & _MASK  # before adding the first word
_Y0 = (_SEED * int(K1) + 113) & _MASK
_T = (_Y0 * int(K2) + 113) & _MASK
_Z0 = ((_T ^ (_T >> 47)) * int(K2)) & _MASK  # ShiftMix(y * k2 + 113) * k2

_SHIFT = {r: (_U64(r), _U64(64 - r)) for r in (18, 21, 25, 30, 33, 37, 42, 43, 44, 47)}


def _rot(v, r):
    """Rotate right by a constant 0 < r < 64 (FarmHash's Rotate64)."""
    right, left = _SHIFT[r]
    return (v >> right) | (v << left)


def _shift_mix(v):
    return v ^ (v >> _SHIFT[47][0])


def _hash_len16(u, v, mul):
    """Murmur-style mix of two words (the three-argument HashLen16)."""
    a = _shift_mix((u ^ v) * mul)
    b = _shift_mix((v ^ a) * mul)
    return b * mul


def _weak_hash_len32_with_seeds(w, x, y, z, a, b):
    """Mix four words and two seeds into a pair of words."""
    a = a + w
    b = _rot(b + a + z, 21)
    c = a
    a = a + x + y
    b = b + _rot(a, 44)
    return a + z, b + c


class _Bytes:
    """All documents concatenated, with little-endian word loads at byte offsets."""

    def __init__(self, docs):
        self.buf = np.frombuffer(b''.join(docs), dtype=np.uint8)

    def byte(self, pos):
        return self.buf[pos].astype(_U64)

    def words(self, pos, n):
        """n consecutive 64-bit words starting at each offset in pos: shape (len(pos), n)."""
        idx = pos[:, None] + np.arange(8 * n, dtype=np.int64)
        return self.buf[idx].view('<u8').astype(_U64, copy=False)

    def fetch64(self, pos):
        return self.words(pos, 1)[:, 0]

    def fetch32(self, pos):
        idx = pos[:, None] + np.arange(4, dtype=np.int64)
        return self.buf[idx].view('<u4')[:, 0].astype(_U64)


def _len_1_to_3(b, s, n):
    # Three sample bytes; y and z fit in 32 bits, as in the C code.
    y = b.byte(s) + (b.byte(s + (n >> 1)) << _U64(8))
    z = n.astype(_U64) + (b.byte(s + n - 1) << _U64(2))
    return _shift_mix(y * K2 ^ z * K0) * K2


def _len_4_to_7(b, s, n):
    n64 = n.astype(_U64)
    mul = K2 + n64 * _U64(2)
    a = b.fetch32(s)
    return _hash_len16(n64 + (a << _U64(3)), b.fetch32(s + n - 4), mul)


def _len_8_to_16(b, s, n):
    mul = K2 + n.astype(_U64) * _U64(2)
    a = b.fetch64(s) + K2
    c = b.fetch64(s + n - 8)  # overlaps the first word when n < 16
    return _hash_len16(_rot(c, 37) * mul + a, (_rot(a, 25) + c) * mul, mul)


def _len_17_to_32(b, s, n):
    mul = K2 + n.astype(_U64) * _U64(2)
    a = b.fetch64(s) * K1
    bb = b.fetch64(s + 8)
    c = b.fetch64(s + n - 8) * mul
    d = b.fetch64(s + n - 16) * K2
    return _hash_len16(_rot(a + bb, 43) + _rot(c, 30) + d, a + _rot(bb + K2, 18) + c, mul)


def _len_33_to_64(b, s, n):
    mul = K2 + n.astype(_U64) * _U64(2)
    head = b.words(s, 4)  # bytes 0..31
    tail = b.words(s + n - 32, 4)  # last 32 bytes (may overlap head)
    a = head[:, 0] * K2
    bb = head[:, 1]
    c = tail[:, 3] * mul
    d = tail[:, 2] * K2
    y = _rot(a + bb, 43) + _rot(c, 30) + d
    z = _hash_len16(y, a + _rot(bb + K2, 18) + c, mul)
    e = head[:, 2] * mul
    f = head[:, 3]
    g = (y + tail[:, 0]) * mul
    h = (z + tail[:, 1]) * mul
    return _hash_len16(_rot(e + f, 43) + _rot(g, 30) + h, e + _rot(f + a, 18) + g, mul)


def _len_over_64(b, s, n):
    # Sort by number of whole 64-byte blocks, longest first, so the documents
    # still looping at block i are always a prefix [:m] of the arrays.
    blocks = (n - 1) // 64  # the loop leaves 1..64 bytes for the final step
    order = np.argsort(-blocks, kind='stable')
    s, n, blocks = s[order], n[order], blocks[order]
    count = len(s)

    x = _U64(_X0) + b.fetch64(s)
    y = np.full(count, _Y0, dtype=_U64)
    z = np.full(count, _Z0, dtype=_U64)
    v0, v1, w0, w1 = (np.zeros(count, dtype=_U64) for _ in range(4))

    # active[i] = how many documents have more than i blocks.
    active = count - np.cumsum(np.bincount(blocks))
    for i in range(int(blocks[0])):
        m = int(active[i])
        p = s[:m] + 64 * i
        q = b.words(p, 8)
        X, Y, Z = x[:m], y[:m], z[:m]
        V0, V1, W0, W1 = v0[:m], v1[:m], w0[:m], w1[:m]
        X = _rot(X + Y + V0 + q[:, 1], 37) * K1
        Y = _rot(Y + V1 + q[:, 6], 42) * K1
        X = X ^ W1
        Y = Y + V0 + q[:, 5]
        Z = _rot(Z + W0, 33) * K1
        V0, V1 = _weak_hash_len32_with_seeds(q[:, 0], q[:, 1], q[:, 2], q[:, 3], V1 * K1, X + W0)
        W0, W1 = _weak_hash_len32_with_seeds(
            q[:, 4], q[:, 5], q[:, 6], q[:, 7], Z + W1, Y + q[:, 2]
        )
        # The C code swaps z and x at the end of each block.
        x[:m], y[:m], z[:m] = Z, Y, X
        v0[:m], v1[:m], w0[:m], w1[:m] = V0, V1, W0, W1

    # Final step on the last 64 bytes (overlapping the last block), with a
    # multiplier that depends on the state.
    q = b.words(s + n - 64, 8)
    mul = K1 + ((z & _U64(0xFF)) << _U64(1))
    w0 = w0 + ((n - 1) & 63).astype(_U64)
    v0 = v0 + w0
    w0 = w0 + v0
    x = _rot(x + y + v0 + q[:, 1], 37) * mul
    y = _rot(y + v1 + q[:, 6], 42) * mul
    x = x ^ (w1 * _U64(9))
    y = y + v0 * _U64(9) + q[:, 5]
    z = _rot(z + w0, 33) * mul
    v0, v1 = _weak_hash_len32_with_seeds(q[:, 0], q[:, 1], q[:, 2], q[:, 3], v1 * mul, x + w0)
    w0, w1 = _weak_hash_len32_with_seeds(q[:, 4], q[:, 5], q[:, 6], q[:, 7], z + w1, y + q[:, 2])
    x, z = z, x
    out = _hash_len16(
        _hash_len16(v0, w0, mul) + _shift_mix(y) * K0 + z, _hash_len16(v1, w1, mul) + x, mul
    )

    result = np.empty(count, dtype=_U64)
    result[order] = out
    return result


# (lowest length, highest length, function) for each code path.
_PATHS = [
    (1, 3, _len_1_to_3),
    (4, 7, _len_4_to_7),
    (8, 16, _len_8_to_16),
    (17, 32, _len_17_to_32),
    (33, 64, _len_33_to_64),
    (65, None, _len_over_64),
]


def fingerprint64(docs):
    """FarmHash Fingerprint64 of each byte string: (N,) uint64, same as TensorFlow's."""
    docs = list(docs)
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    starts = np.zeros(len(docs), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    b = _Bytes(docs)

    out = np.full(len(docs), K2, dtype=_U64)  # the hash of b'' is k2
    with np.errstate(over='ignore'):
        for lo, hi, fn in _PATHS:
            sel = np.flatnonzero(
                (lengths >= lo) if hi is None else ((lengths >= lo) & (lengths <= hi))
            )
            if sel.size:
                out[sel] = fn(b, starts[sel], lengths[sel])
    return out


def hash_buckets(docs, num_buckets):
    """Same as tf.strings.to_hash_bucket_fast(docs, num_buckets).numpy(): (N,) int64."""
    if num_buckets < 1:
        raise ValueError(f'num_buckets must be positive, got {num_buckets}')
    return (fingerprint64(docs) % _U64(num_buckets)).astype(np.int64)
