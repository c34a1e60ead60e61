"""`.bin` files as InsightFace ships them: Python-2 pickles of JPEG `str`s, and uint8 arrays; cheap structure check."""

import io
import pickle
import struct

import numpy as np
import pytest
import simplejpeg
from PIL import Image

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


def test_one_dimensional_uint8_arrays_of_encoded_bytes(tmp_path):
    """Bins re-saved with numpy hold each JPEG/PNG as a 1-D uint8 array, mixed with bytes and decoded arrays."""
    imgs = images(6, seed=2)
    png = io.BytesIO()
    Image.fromarray(imgs[1]).save(png, format="PNG")
    items = [
        np.frombuffer(simplejpeg.encode_jpeg(imgs[0], quality=100), np.uint8),  # 1-D JPEG bytes
        np.frombuffer(png.getvalue(), np.uint8).copy(),  # 1-D PNG bytes (lossless: exact)
        simplejpeg.encode_jpeg(imgs[2], quality=100),  # bytes, as InsightFace ships them
        imgs[3],  # decoded HxWx3
        np.frombuffer(simplejpeg.encode_jpeg(imgs[4], quality=100), np.uint8),
        imgs[5],
    ]
    path = tmp_path / "mixed.bin"
    with path.open("wb") as f:
        pickle.dump((items, [True, False, True]), f, protocol=4)
    assert items[0].ndim == 1 and items[0].shape[0] > 1000  # really the "(7122,)"-style shape from the issue
    got, issame = load_bin(path)
    assert got.shape == (6, 112, 112, 3) and issame.tolist() == [True, False, True]
    assert np.array_equal(got[1], imgs[1]) and np.array_equal(got[3], imgs[3]) and np.array_equal(got[5], imgs[5])
    for i in (0, 2, 4):  # JPEG at quality 100: near-identical to the source
        assert np.abs(got[i].astype(int) - imgs[i]).mean() < 3


@pytest.mark.parametrize("bad, match", [
    (np.frombuffer(b"garbage bytes, not an image", np.uint8),
     r"bad.bin: image 1 cannot be decoded \(a uint8 array of shape \(27,\)\)"),
    (np.zeros((112, 112, 3), np.float32), r"bad.bin: image 1 is a float32 array of shape \(112, 112, 3\)"),
    (np.zeros((112, 112), np.uint8), r"bad.bin: image 1 is a uint8 array of shape \(112, 112\)"),
    (np.zeros(40, np.int64), r"bad.bin: image 1 is a int64 array of shape \(40,\)"),
    (np.zeros((96, 112, 3), np.uint8), r"bad.bin: image 1 has shape \(96, 112, 3\), expected \(112, 112, 3\)"),
])
def test_arrays_that_are_neither_name_index_and_shape(tmp_path, bad, match):
    good = np.frombuffer(simplejpeg.encode_jpeg(images(1)[0]), np.uint8)
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(([good, bad], [True])))
    with pytest.raises(BinFormatError, match=match):
        load_bin(path)
