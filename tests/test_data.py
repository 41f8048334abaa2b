"""Data sources and the grain pipeline: formats, errors naming the file, order, resume, sharding."""
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_flax import input_pipeline as ip


def test_digits_default():
    data = ip.load(None, 16)
    assert data.images.shape == (1797, 16, 16, 1) and data.images.dtype == np.uint8
    assert data.num_classes == 10 and data.labels.shape == (1797,)
    batch = next(iter(ip.make_dataset(data, 32, seed=0).to_iter_dataset()))
    assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.uint8  # scaled on the devices
    assert batch["image"].max() > 230 and batch["label"].dtype == np.int32 and not batch["bad_images"].any()


def test_digits_are_scikit_learns():
    """Read from the CSV inside the package: the same images and labels as sklearn's load_digits."""
    from sklearn.datasets import load_digits

    digits, data = load_digits(), ip.load(None, 8)
    np.testing.assert_array_equal(data.images[..., 0], np.round(digits.images * 255 / 16).astype(np.uint8))
    np.testing.assert_array_equal(data.labels, digits.target)


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
    assert len(data) == 7 and data.channels == 3 and data.class_names == ("cat", "dog")
    assert [int(data[i]["label"]) for i in range(7)] == [0, 0, 0, 1, 1, 1, 1]
    assert all(data[i]["image"].shape == (8, 8, 3) and data[i]["image"].dtype == np.uint8 for i in range(7))


def test_center_crop_keeps_the_middle():
    image = np.zeros((8, 24), np.uint8)
    image[:, 8:16] = 255
    out = ip._resize_center_crop(Image.fromarray(image), 8)
    assert out.shape == (8, 8) and out.min() > 200


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    _write(tmp_path / ".hidden.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ip.DataError, match=r"holds no images \(files Pillow reads: .png, .jpg, .webp, .bmp, .tif and "
                                           r"\d+ more suffixes; hidden files and folders are skipped\)"):
        ip.load(str(tmp_path), 8)


def test_every_format_pillow_writes_is_read_and_hidden_entries_are_skipped(tmp_path):
    rng = np.random.default_rng(1)
    pixels = {}
    for suffix in (".png", ".bmp", ".tiff", ".webp", ".gif", ".ppm", ".tga"):
        pixels[suffix] = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels[suffix]).save(tmp_path / f"x{suffix}",
                                             **({"lossless": True} if suffix == ".webp" else {}))
    _write(tmp_path / ".ipynb_checkpoints" / "x-checkpoint.png", np.zeros((8, 8, 3), np.uint8))
    _write(tmp_path / ".thumbnail.png", np.zeros((8, 8, 3), np.uint8))
    data = ip.load(str(tmp_path), 8)
    assert data.class_names is None  # the hidden folder is no class
    assert sorted(Path(f).suffix for f in data.files) == sorted(pixels)
    for i, path in enumerate(data.files):
        expected = pixels[Path(path).suffix]
        if Path(path).suffix == ".gif":  # a palette of at most 256 colours: close, not exact
            assert np.abs(data[i]["image"].astype(int) - expected).mean() < 40
        else:
            np.testing.assert_array_equal(data[i]["image"], expected)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    data = ip.load(str(tmp_path), 4)
    assert data.channels == 1
    np.testing.assert_array_equal(data[0]["image"][0, :, 0], [0, 1, 128, 255])


def test_the_colour_mode_comes_from_every_file_header(tmp_path):
    """One colour image among 40 grey ones, where a sample of 16 files would miss it."""
    for i in range(40):
        _write(tmp_path / f"grey{i:02d}.png", np.full((4, 4), i, np.uint8))
    _write(tmp_path / "grey07b.png", np.zeros((4, 4, 3), np.uint8))
    assert ip.load(str(tmp_path), 4).channels == 3
    (tmp_path / "grey07b.png").unlink()
    assert ip.load(str(tmp_path), 4).channels == 1
    _write(tmp_path / "grey.jpg", np.full((4, 4), 9, np.uint8))  # JPEG headers are read too: grey stays grey
    assert ip.load(str(tmp_path), 4).channels == 1
    _write(tmp_path / "colour.jpg", np.zeros((4, 4, 3), np.uint8))
    assert ip.load(str(tmp_path), 4).channels == 3


def test_grey_and_colour_images_mix_as_colour(tmp_path):
    _write(tmp_path / "a.png", np.full((4, 4), 200, np.uint8))
    _write(tmp_path / "b.png", np.zeros((4, 4, 3), np.uint8))
    data = ip.load(str(tmp_path), 4)
    assert data.channels == 3 and data[0]["image"].shape == (4, 4, 3) and data[0]["image"].min() == 200


def _folder_with_a_truncated_image(folder):
    for i in range(4):
        _write(folder / f"ok{i}.png", np.full((16, 16, 3), 40 * i, np.uint8))
    cut = folder / "ok2_cut.png"
    _write(cut, np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    cut.write_bytes(cut.read_bytes()[:200])
    return cut


def test_an_unreadable_image_is_named_when_read(tmp_path):
    cut = _folder_with_a_truncated_image(tmp_path)
    data = ip.load(str(tmp_path), 8)  # start-up lists the files and decodes nothing but a sample
    assert len(data) == 5 and data.files[3] == str(cut)
    with pytest.raises(ip.DataError, match=r"cannot read image .*ok2_cut.png"):
        data[3]


def test_skip_bad_images_reads_the_next_one_and_counts(tmp_path):
    _folder_with_a_truncated_image(tmp_path)
    data = ip.load(str(tmp_path), 8, skip_bad_images=True)
    example = data[3]
    assert int(example["bad_images"]) == 1 and example["image"].min() == 120  # ok3.png stands in
    assert int(data[2]["bad_images"]) == 0


def test_npz(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((5, 8, 8, 3), np.uint8), labels=np.array([0, 1, 2, 1, 0]))
    data = ip.load(str(path), 8)
    assert data.images.shape == (5, 8, 8, 3) and data.num_classes == 3 and data.in_memory


@pytest.mark.parametrize("arrays,message", [
    (dict(pictures=np.zeros((2, 4, 4, 1), np.uint8)), "has no 'images' array \\(found: pictures\\)"),
    (dict(images=np.zeros((2, 4, 4, 1), np.float32)), "must be uint8 NHWC .* got float32"),
    (dict(images=np.zeros((2, 4, 4), np.uint8)), r"got uint8 with shape \(2, 4, 4\)"),
    (dict(images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.array([0])), "'labels' must be 2 non-negative"),
    # Members np.load reads only when taken: Python objects (pickled) are refused there, inside the handling.
    (dict(images=np.empty((2, 4, 4, 1), object)), "cannot read .*d.npz: its 'images' array: Object arrays cannot be "
                                                  "loaded when allow_pickle=False"),
    (dict(images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.array([0, "cat"], object)),
     "its 'labels' array: Object arrays"),
    (dict(images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.array([0.5, 1.0])), "'labels' must be 2 non-negative "
                                                                                 "integers, got float64"),
])
def test_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(ip.DataError, match=message):
        ip.load(str(path), 4)


def test_an_npz_with_a_damaged_member_is_one_error(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((64, 8, 8, 1), np.uint8))
    data = bytearray(path.read_bytes())
    data[200:260] = b"\xff" * 60  # inside the 'images' member's bytes, after its header
    path.write_bytes(bytes(data))
    with pytest.raises(ip.DataError, match=r"cannot read .*d.npz"):
        ip.load(str(path), 8)


def test_cifar10_batches_folder(tmp_path):
    import pickle
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [i % 10] * 4}, f)
    data = ip.load(str(tmp_path), 32)
    assert data.images.shape == (20, 32, 32, 3) and data.labels.tolist()[:4] == [1, 1, 1, 1]


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_cifar10_batch_that_would_run_code_is_refused(tmp_path, capsys):
    import pickle
    for i in range(1, 6):
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _RunsCode()}, f)
    with pytest.raises(ip.DataError, match=r"cannot read CIFAR-10 batch .*data_batch_1: builtins.print is not part "
                                           r"of a CIFAR-10 batch; refused"):
        ip.load(str(tmp_path), 32)
    assert "this ran" not in capsys.readouterr().out


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


def _colour_folder(folder, count=12, size=(10, 14)):
    rng = np.random.default_rng(5)
    for i in range(count):
        _write(folder / ("a" if i % 3 else "b") / f"{i:03d}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return folder


def test_workers_serve_the_same_batches_and_resume_by_index(tmp_path):
    data = ip.load(str(_colour_folder(tmp_path)), 8)
    dataset = ip.make_dataset(data, 4, seed=2, hflip=True)
    here = ip.batches_from(dataset, 0, workers=0)
    expected = [next(here) for _ in range(7)]  # past the first epoch (3 batches)
    in_workers = ip.batches_from(dataset, 2, workers=2)
    try:
        for want in expected[2:]:
            got = next(in_workers)
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
    finally:
        in_workers.close()


def test_closing_the_default_workers_does_not_wait_for_them(tmp_path):
    """Workers that hold batches nobody will read (larger than a pipe's buffer) are stopped at once: closing
    once waited grain's 25 s kill timeout for each, at random, at the end of every run. Three rounds,
    each stopping workers that filled their buffers."""
    data = ip.load(str(_colour_folder(tmp_path, count=16, size=(64, 64))), 64)
    dataset = ip.make_dataset(data, 16, seed=0)
    for _ in range(3):
        batches = ip.batches_from(dataset, 0, workers=ip.default_workers(data))
        next(batches)
        time.sleep(0.5)  # the workers fill their buffers
        start = time.perf_counter()
        batches.close()
        assert time.perf_counter() - start < 10


def test_packed_records_hold_what_the_folder_holds(tmp_path):
    data = ip.load(str(_colour_folder(tmp_path / "images")), 8)
    result = ip.pack(str(tmp_path / "images"), str(tmp_path / "packed"), 8, examples_per_shard=5, workers=2)
    assert result["count"] == 12 and result["shards"] == 3
    packed = ip.load(str(tmp_path / "packed"), 8)
    assert len(packed) == 12 and packed.class_names == ("a", "b") and packed.channels == 3 and not packed.in_memory
    for i in range(12):
        np.testing.assert_array_equal(packed[i]["image"], data[i]["image"])
        assert int(packed[i]["label"]) == int(data[i]["label"])
    with pytest.raises(ip.DataError, match=r"holds 8x8 images, the model wants 16x16"):
        ip.load(str(tmp_path / "packed"), 16)
    with pytest.raises(FileExistsError, match="is not empty"):
        ip.pack(str(tmp_path / "images"), str(tmp_path / "packed"), 8)


def test_pack_command_line_packs_an_npz(tmp_path):
    import json

    from commands import run_main, run_process

    images = np.random.default_rng(0).integers(0, 255, (7, 6, 6, 1), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(7) % 2)
    result = run_process("unet_flax.scripts.pack", tmp_path / "d.npz", "--out", tmp_path / "out",
                         "--image-size", "6", check=True)
    assert json.loads(result.stdout.splitlines()[-1])["count"] == 7
    packed = ip.load(str(tmp_path / "out"), 6)
    np.testing.assert_array_equal(np.stack([packed[i]["image"] for i in range(7)]), images)
    bad = run_main("unet_flax.scripts.pack", tmp_path / "d.npz", "--out", tmp_path / "out2",
                   "--image-size", "0")
    assert bad.returncode == 2 and "--image-size must be positive, got 0" in bad.stderr
