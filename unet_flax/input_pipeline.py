"""Training data: images as uint8 NHWC in memory, served by a grain pipeline.

Sources: scikit-learn's digits (the default, nothing downloaded), a folder of PNG/JPEG images
(labels from sub-folder names), an .npz with uint8 NHWC `images` (and optional `labels`), or a
CIFAR-10 "python version" folder. grain gives a deterministic per-seed order, reshuffled each
epoch, and an iterator whose position is checkpointed with the model, so a resumed run sees the
very batches an uninterrupted one would. Each process reads only its own rows of every global
batch, and those rows do not depend on the number of processes.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class DataError(ValueError):
    """The data cannot be used; the message names the file or value."""


@dataclasses.dataclass(frozen=True)
class ImageData:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray | None  # int32, (N,)
    class_names: tuple[str, ...] | None
    source: str

    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[-1]


def load(path: str | None, image_size: int) -> ImageData:
    """Load a data source and bring its images to image_size x image_size."""
    if path is None:
        return _digits(image_size)
    source = Path(path)
    if not source.exists():
        raise DataError(f"data path {path!r} does not exist")
    if source.is_file():
        if source.suffix != ".npz":
            raise DataError(f"data file {path!r} is not an .npz (a folder of images is also accepted)")
        return _npz(source, image_size)
    if (source / "data_batch_1").exists():
        return _cifar10(source, image_size)
    return _image_folder(source, image_size)


def _resize(images: np.ndarray, image_size: int) -> np.ndarray:
    if images.shape[1:3] == (image_size, image_size):
        return images
    return np.stack([_resize_center_crop(Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im), image_size)
                     .reshape(image_size, image_size, images.shape[-1]) for im in images])


def _resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Scale the short side to `size` (bicubic), then crop the centre square."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _digits(image_size: int) -> ImageData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # 0..16 -> 0..255
    return ImageData(_resize(images, image_size), digits.target.astype(np.int32),
                     tuple(str(d) for d in range(10)), "sklearn digits")


def _npz(path: Path, image_size: int) -> ImageData:
    try:
        arrays = np.load(path)
    except Exception as error:  # a truncated or foreign file
        raise DataError(f"cannot read {path}: {error}") from None
    if "images" not in arrays:
        raise DataError(f"{path} has no 'images' array (found: {', '.join(arrays.files) or 'nothing'})")
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{path}: 'images' must be uint8 NHWC with 1 or 3 channels, "
                        f"got {images.dtype} with shape {images.shape}")
    if len(images) == 0:
        raise DataError(f"{path}: 'images' is empty")
    labels, names = None, None
    if "labels" in arrays:
        labels = arrays["labels"]
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise DataError(f"{path}: 'labels' must be {len(images)} non-negative integers, "
                            f"got {labels.dtype} with shape {labels.shape}")
        labels = labels.astype(np.int32)
        names = tuple(str(c) for c in range(int(labels.max()) + 1))
    return ImageData(_resize(images, image_size), labels, names, str(path))


def _cifar10(folder: Path, image_size: int) -> ImageData:
    images, labels = [], []
    for i in range(1, 6):
        path = folder / f"data_batch_{i}"
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], np.int32))
        except Exception as error:
            raise DataError(f"cannot read CIFAR-10 batch {path}: {error}") from None
    names = tuple(str(i) for i in range(10))
    meta = folder / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as f:
            names = tuple(n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"])
    return ImageData(_resize(np.concatenate(images), image_size), np.concatenate(labels), names, str(folder))


def _image_folder(folder: Path, image_size: int) -> ImageData:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"data folder {folder} holds no PNG or JPEG images")
    class_dirs = sorted({p.parent.relative_to(folder).as_posix() for p in files})
    labelled = class_dirs != ["."]
    images, channels = [], None
    for path in files:
        try:
            with Image.open(path) as image:
                image.load()
                mode = "L" if image.mode in ("L", "LA", "I", "I;16", "1") else "RGB"
                array = _resize_center_crop(image.convert(mode), image_size)
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"cannot read image {path}: {error}") from None
        array = array[..., None] if array.ndim == 2 else array
        if channels is None:
            channels, first = array.shape[-1], path
        elif array.shape[-1] != channels:
            raise DataError(f"image {path} has {array.shape[-1]} channels, but {first} has {channels}: "
                            f"convert the folder to one mode")
        images.append(array)
    labels, names = None, None
    if labelled:
        names = tuple(class_dirs)
        labels = np.asarray([names.index(p.parent.relative_to(folder).as_posix()) for p in files], np.int32)
    return ImageData(np.stack(images), labels, names, str(folder))


# -- the grain pipeline ---------------------------------------------------------------------------

class _Examples:
    """Random access to (image, label) pairs, as grain's MapDataset.source wants."""

    def __init__(self, data: ImageData):
        self.images = data.images
        self.labels = np.zeros(len(data.images), np.int32) if data.labels is None else data.labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}


def _random_flip(example: dict, rng: np.random.Generator) -> dict:
    if rng.random() < 0.5:
        example = {**example, "image": example["image"][:, ::-1]}
    return example


def _to_model_range(batch: dict) -> dict:
    return {"image": to_model_range(batch["image"]), "label": batch["label"]}


def make_dataset(data: ImageData, global_batch: int, seed: int, hflip: bool = False,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Endless batches of this process's rows: global batch b is local batches b*P .. b*P+P-1."""
    if global_batch % process_count:
        raise DataError(f"batch size {global_batch} is not divisible by the {process_count} processes")
    local_batch = global_batch // process_count
    dataset = grain.MapDataset.source(_Examples(data)).shuffle(seed=seed).repeat(None)
    if hflip:
        dataset = dataset.random_map(_random_flip, seed=seed + 1)
    dataset = dataset.batch(local_batch, drop_remainder=True)
    dataset = dataset.slice(slice(process_index, None, process_count))
    return dataset.map(_to_model_range)


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8, clipped."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
