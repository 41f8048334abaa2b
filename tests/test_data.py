"""Data sources and the grain pipeline: formats, errors naming the file, order, resume, sharding."""
import numpy as np
import pytest
from PIL import Image

from unet_flax import input_pipeline as ip


def test_digits_default():
    data = ip.load(None, 16)
    assert data.images.shape == (1797, 16, 16, 1) and data.images.dtype == np.uint8
    assert data.num_classes == 10 and data.labels.shape == (1797,)
    batch = next(iter(ip.make_dataset(data, 32, seed=0).to_iter_dataset()))
    assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].max() > 0.9


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        for i in range(3):
            _write(tmp_path / name / f"{i}.png", rng.integers(0, 255, (20, 12, 3), dtype=np.uint8))
    _write(tmp_path / "dog" / "wide.jpg", rng.integers(0, 255, (10, 40, 3), dtype=np.uint8))
    data = ip.load(str(tmp_path), 8)
    assert data.images.shape == (7, 8, 8, 3) and data.class_names == ("cat", "dog")
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_center_crop_keeps_the_middle():
    image = np.zeros((8, 24), np.uint8)
    image[:, 8:16] = 255
    out = ip._resize_center_crop(Image.fromarray(image), 8)
    assert out.shape == (8, 8) and out.min() > 200


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "holds no PNG or JPEG images"),
    (lambda d: (d / "bad.png").write_bytes(b"not a png"), "cannot read image .*bad.png"),
    (lambda d: (_write(d / "a.png", np.zeros((4, 4, 3), np.uint8)), _write(d / "b.png", np.zeros((4, 4), np.uint8))),
     r"image .*b.png has 1 channels, but .*a.png has 3"),
])
def test_folder_errors_name_the_file(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(ip.DataError, match=message):
        ip.load(str(tmp_path), 8)


def test_truncated_image_is_named(tmp_path):
    _write(tmp_path / "ok.png", np.zeros((16, 16, 3), np.uint8))
    full = tmp_path / "cut.png"
    _write(full, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    full.write_bytes(full.read_bytes()[:200])
    with pytest.raises(ip.DataError, match=r"cannot read image .*cut.png"):
        ip.load(str(tmp_path), 8)


def test_npz(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((5, 8, 8, 3), np.uint8), labels=np.array([0, 1, 2, 1, 0]))
    data = ip.load(str(path), 8)
    assert data.images.shape == (5, 8, 8, 3) and data.num_classes == 3


@pytest.mark.parametrize("arrays,message", [
    (dict(pictures=np.zeros((2, 4, 4, 1), np.uint8)), "has no 'images' array \\(found: pictures\\)"),
    (dict(images=np.zeros((2, 4, 4, 1), np.float32)), "must be uint8 NHWC .* got float32"),
    (dict(images=np.zeros((2, 4, 4), np.uint8)), r"got uint8 with shape \(2, 4, 4\)"),
    (dict(images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.array([0])), "'labels' must be 2 non-negative"),
])
def test_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(ip.DataError, match=message):
        ip.load(str(path), 4)


def test_cifar10_batches_folder(tmp_path):
    import pickle
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [i % 10] * 4}, f)
    data = ip.load(str(tmp_path), 32)
    assert data.images.shape == (20, 32, 32, 3) and data.labels.tolist()[:4] == [1, 1, 1, 1]


def _take(dataset, count):
    iterator = iter(dataset.to_iter_dataset())
    return [next(iterator) for _ in range(count)]


def test_order_is_deterministic_per_seed_and_reshuffled_each_epoch():
    data = ip.ImageData(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1), None, None, "test")
    first = [b["image"].ravel() for b in _take(ip.make_dataset(data, 5, seed=3), 4)]
    again = [b["image"].ravel() for b in _take(ip.make_dataset(data, 5, seed=3), 4)]
    other = [b["image"].ravel() for b in _take(ip.make_dataset(data, 5, seed=4), 4)]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    epoch1, epoch2 = np.concatenate(first[:2]), np.concatenate(first[2:])
    assert sorted(epoch1) == sorted(epoch2) and not np.array_equal(epoch1, epoch2)


def test_iterator_resumes_mid_epoch():
    data = ip.load(None, 8)
    iterator = iter(ip.make_dataset(data, 16, seed=0, hflip=True).to_iter_dataset())
    for _ in range(150):  # past the first epoch (112 batches)
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator)["image"] for _ in range(3)]
    resumed = iter(ip.make_dataset(data, 16, seed=0, hflip=True).to_iter_dataset())
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["image"], want)


def test_processes_read_their_rows_of_the_same_global_batches():
    data = ip.load(None, 8)
    whole = _take(ip.make_dataset(data, 12, seed=1, hflip=True), 3)
    parts = [_take(ip.make_dataset(data, 12, seed=1, hflip=True, process_index=p, process_count=3), 3)
             for p in range(3)]
    for step in range(3):
        joined = np.concatenate([parts[p][step]["image"] for p in range(3)])
        np.testing.assert_array_equal(joined, whole[step]["image"])
