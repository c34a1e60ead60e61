"""Verification protocol on constructed embeddings whose accuracy is known, and .bin loading."""

import pickle

import numpy as np
import pytest
import simplejpeg
import torch

from facescale.eval.verification import BinFormatError, compute_embeddings, evaluate, load_bin


def pair_embeddings(dists):
    """Unit embeddings in 3-D whose pairs have the given squared L2 distances."""
    emb = []
    for d in dists:
        angle = np.arccos(1.0 - d / 2.0)  # |a - b|^2 = 2 - 2 cos(angle)
        emb.append([1.0, 0.0, 0.0])
        emb.append([np.cos(angle), np.sin(angle), 0.0])
    return np.array(emb)


def test_known_accuracy_with_planted_errors():
    n = 1000
    issame = np.arange(n) % 2 == 0
    dists = np.where(issame, 0.5, 2.0)
    wrong = np.arange(0, n, 20)  # 50 same pairs at impostor distance: exactly 5 per fold of 100
    dists[wrong] = 2.0
    res = evaluate(pair_embeddings(dists), issame)
    assert res["accuracy_mean"] == pytest.approx(0.95)
    assert res["accuracy_std"] == pytest.approx(0.0, abs=1e-12)
    assert all(0.5 < t <= 2.0 for t in res["fold_thresholds"])
    assert len(res["fold_accuracies"]) == 10


def brute_force(emb, issame, nfolds=10):
    """Independent, loop-only implementation of the same protocol."""
    n = len(issame)
    d = [float(sum((emb[2 * i][k] - emb[2 * i + 1][k]) ** 2 for k in range(emb.shape[1]))) for i in range(n)]
    sizes = [n // nfolds + (1 if f < n % nfolds else 0) for f in range(nfolds)]
    accs, start = [], 0
    for size in sizes:
        test = set(range(start, start + size))
        start += size
        best_t, best_acc = None, -1.0
        for t in [i / 100 for i in range(400)]:
            train = [i for i in range(n) if i not in test]
            acc = sum((d[i] < t) == issame[i] for i in train) / len(train)
            if acc > best_acc:
                best_t, best_acc = t, acc
        accs.append(sum((d[i] < best_t) == issame[i] for i in test) / len(test))
    return float(np.mean(accs))


def test_matches_brute_force_on_random_embeddings():
    rng = np.random.default_rng(3)
    n = 123  # not divisible by 10: uneven folds
    issame = rng.random(n) < 0.5
    a = rng.normal(size=(n, 4))
    b = np.where(issame[:, None], a + rng.normal(scale=0.8, size=(n, 4)), rng.normal(size=(n, 4)))
    emb = np.empty((2 * n, 4))
    emb[0::2], emb[1::2] = a, b
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert evaluate(emb, issame)["accuracy_mean"] == pytest.approx(brute_force(emb, issame), abs=1e-12)


def test_embeddings_are_normalised_sum_with_flip():
    def model(x):  # embedding = mean of the left half minus mean of the right half of each channel
        w = x.shape[3] // 2
        return torch.cat([x[..., :w].mean((2, 3)), x[..., w:].mean((2, 3))], dim=1)

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(2, 112, 112, 3), dtype=np.uint8)
    emb = compute_embeddings(model, imgs, batch_size=1)
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    expected = torch.nn.functional.normalize(model(x) + model(torch.flip(x, dims=[3])))
    assert np.allclose(emb, expected.numpy(), atol=1e-6)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def _write(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def test_load_bin_encoded_and_arrays(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8) for _ in range(4)]
    enc = [simplejpeg.encode_jpeg(i, quality=95) for i in imgs]
    images, issame = load_bin(_write(tmp_path / "enc.bin", (enc, [True, False])))
    assert images.shape == (4, 112, 112, 3) and images.dtype == np.uint8
    assert issame.tolist() == [True, False]
    images, _ = load_bin(_write(tmp_path / "arr.bin", (imgs, [True, False])))
    assert np.array_equal(images[2], imgs[2])


@pytest.mark.parametrize(
    "obj, match",
    [
        ({"not": "a tuple"}, "expected a pickled"),
        (([b"x"] * 3, [True]), "odd number"),
        (([b"x"] * 4, [True]), "issame has 1 labels"),
        (([b"not a jpeg"] * 2, [True]), "image 0 cannot be decoded"),
    ],
)
def test_load_bin_bad_input_names_file(tmp_path, obj, match):
    path = _write(tmp_path / "bad.bin", obj)
    with pytest.raises(BinFormatError, match=match) as exc:
        load_bin(path)
    assert str(path) in str(exc.value)


def test_load_bin_not_a_pickle(tmp_path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(BinFormatError, match="not a pickled") as exc:
        load_bin(path)
    assert str(path) in str(exc.value)


def test_load_bin_decodes_png_with_pil_and_jpeg_with_simplejpeg(tmp_path):
    import io

    from PIL import Image

    from facescale.eval.images import decode_rgb

    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8) for _ in range(2)]
    png = io.BytesIO()
    Image.fromarray(imgs[0]).save(png, format="PNG")
    jpeg = simplejpeg.encode_jpeg(imgs[1], quality=90)
    images, _ = load_bin(_write(tmp_path / "mixed.bin", ([png.getvalue(), np.frombuffer(jpeg, np.uint8)], [True])))
    assert np.array_equal(images[0], imgs[0])  # PNG is lossless: PIL's decode is the original
    assert np.array_equal(images[1], simplejpeg.decode_jpeg(jpeg, colorspace="RGB"))
    assert np.array_equal(decode_rgb(jpeg), images[1]) and np.array_equal(decode_rgb(png.getvalue()), imgs[0])
    with pytest.raises(BinFormatError, match="image 1 cannot be decoded"):  # a JPEG marker, then garbage: both fail
        load_bin(_write(tmp_path / "bad.bin", ([png.getvalue(), b"\xff\xd8 not a jpeg"], [True])))
