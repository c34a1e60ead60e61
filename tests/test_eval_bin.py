"""`.bin` files as InsightFace ships them: Python-2 pickles of JPEG `str`s, and uint8 arrays; cheap structure check."""

import io
import pickle
import struct

import numpy as np
import pytest
import simplejpeg

from facescale.eval.verification import BinFormatError, check_bin, load_bin


class Py2Pickler(pickle._Pickler):
    """Writes bytes the way Python 2 wrote `str` (BINSTRING opcodes), as InsightFace's original .bin files hold them."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [np.kron(rng.integers(0, 256, (14, 14, 3)), np.ones((8, 8, 1))).astype(np.uint8) for _ in range(n)]


def test_python2_pickle_of_jpeg_strings(tmp_path):
    imgs = images(4)
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(([simplejpeg.encode_jpeg(i, quality=100) for i in imgs], [True, False]))
    path = tmp_path / "lfw.bin"
    path.write_bytes(buf.getvalue())
    with pytest.raises(UnicodeDecodeError):  # really Python-2 style: the default ASCII decoding cannot read it
        pickle.loads(buf.getvalue())
    got, issame = load_bin(path)
    assert issame.tolist() == [True, False] and got.shape == (4, 112, 112, 3)
    assert np.abs(got.astype(int) - np.stack(imgs)).mean() < 3  # JPEG at quality 100: near-identical
    assert check_bin(path) == 2


def test_uint8_array_bin_and_ndarray_container(tmp_path):
    imgs = np.stack(images(6, seed=1))
    path = tmp_path / "arrays.bin"
    path.write_bytes(pickle.dumps((imgs, np.array([True, False, True]))))
    got, issame = load_bin(path)
    assert np.array_equal(got, imgs) and issame.tolist() == [True, False, True]


def test_check_bin_finds_structure_errors_without_decoding(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(([b"not decoded by check_bin"] * 4, [True, True])))
    assert check_bin(path) == 2  # structure is fine; the bad bytes only show when decoding
    with pytest.raises(BinFormatError, match="image 0 cannot be decoded"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([b"x"] * 5, [True, True])))
    with pytest.raises(BinFormatError, match=r"bad.bin: 5 images is an odd number"):
        check_bin(path)
