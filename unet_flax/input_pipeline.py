"""Training data: uint8 NHWC examples from a random-access source, served by a grain pipeline.

Sources: scikit-learn's digits (the default, nothing downloaded), an .npz with uint8 NHWC `images`
(and optional `labels`) and a CIFAR-10 "python version" folder are held in memory; a folder of
PNG/JPEG images (labels from sub-folder names) is only listed at start-up and each image is decoded,
resized and centre-cropped when a batch needs it; a folder of ArrayRecord shards written by
`python -m unet_flax.scripts.pack` holds examples ready to use, for the largest sets.

The pipeline is a grain MapDataset: a deterministic per-seed order, reshuffled each epoch, batched,
each process taking only its own rows of every global batch (rows that do not depend on the number
of processes). Batch k is a pure function of k, so a run resumes from the number of batches it has
consumed, whatever the number of grain worker processes that decode them. Batches stay uint8: the
devices scale them.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import multiprocessing
import os
import pickle
import time
import weakref
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import BinaryIO, Protocol

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

# Every file Pillow opens by itself: its formats' suffixes, less the stubs that need a plug-in or a
# program Pillow does not ship (HDF5, GRIB, BUFR, PostScript, Windows metafiles) and video.
STUB_SUFFIXES = {".h5", ".hdf", ".grib", ".bufr", ".eps", ".ps", ".emf", ".wmf", ".mpeg", ".mpg"}
IMAGE_SUFFIXES = {suffix for suffix, image_format in Image.registered_extensions().items()
                  if image_format in Image.OPEN} - STUB_SUFFIXES
# Modes with one channel: decoded as grey. 16- and 32-bit integer grey is scaled from 0..65535.
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
RECORDS_INFO = "unet_flax_records.json"  # marks a folder written by `pack`
Example = dict[str, np.ndarray]


class Source(Protocol):
    """What the pipeline reads: random access to {'image': uint8 HWC, 'label': int32, 'bad_images': int32}
    ('bad_images': unreadable files passed over to produce this example), and what the model needs."""

    class_names: tuple[str, ...] | None
    source: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...

    @property
    def channels(self) -> int: ...

    @property
    def num_classes(self) -> int | None: ...


class _Classes:
    @property
    def num_classes(self) -> int | None:
        return None if self.class_names is None else len(self.class_names)


@dataclasses.dataclass(frozen=True)
class ImageData(_Classes):
    """Images held in memory: the small sources."""

    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray | None  # int32, (N,)
    class_names: tuple[str, ...] | None
    source: str
    in_memory = True

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Example:
        label = 0 if self.labels is None else self.labels[index]
        return {"image": self.images[index], "label": np.int32(label), "bad_images": np.int32(0)}


@dataclasses.dataclass(frozen=True)
class ImageFolder(_Classes):
    """Image files, decoded when read (in grain's worker processes): start-up only lists them.

    An unreadable file raises DataError naming it, or with `skip_bad` is passed over for the next
    readable file (deterministically, so resume stays exact) and counted in the example."""

    files: tuple[str, ...]
    labels: np.ndarray | None  # int32, (N,)
    class_names: tuple[str, ...] | None
    source: str
    image_size: int
    mode: str  # "L" or "RGB" (colour if any image is): every image is converted to it
    skip_bad: bool = False
    in_memory = False

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Example:
        for tried in range(len(self.files)):
            position = (index + tried) % len(self.files)
            try:
                image = decode_image(self.files[position], self.image_size, self.mode)
            except DataError:
                if not self.skip_bad:
                    raise
                continue
            label = 0 if self.labels is None else self.labels[position]
            return {"image": image, "label": np.int32(label), "bad_images": np.int32(tried)}
        raise DataError(f"no image in {self.source} could be read")


@dataclasses.dataclass(frozen=True)
class PackedRecords(_Classes):
    """ArrayRecord shards written by `pack`: each record a label (int32) and the uint8 pixels."""

    paths: tuple[str, ...]
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None
    source: str
    in_memory = False

    @property
    def channels(self) -> int:
        return self.image_shape[-1]

    @functools.cached_property
    def _records(self) -> grain.sources.ArrayRecordDataSource:
        return grain.sources.ArrayRecordDataSource(list(self.paths))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Example:
        record = self._records[index]
        label = np.frombuffer(record[:4], "<i4")[0]
        image = np.frombuffer(record[4:], np.uint8).reshape(self.image_shape)
        return {"image": image, "label": np.int32(label), "bad_images": np.int32(0)}

    def __getstate__(self) -> dict:
        # Worker processes open their own readers.
        return {k: v for k, v in self.__dict__.items() if k != "_records"}


def load(path: str | None, image_size: int, skip_bad_images: bool = False) -> Source:
    """The data source at `path` (None: the digits), its images brought to image_size x image_size."""
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
    if (source / RECORDS_INFO).exists():
        return _packed_records(source, image_size)
    return _image_folder(source, image_size, skip_bad_images)


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
    # The CSV that sklearn.datasets.load_digits reads (64 pixels 0..16, then the label), read from
    # the installed package without importing it: importing scikit-learn (SciPy and all) would add
    # about a second to every start of train.py.
    sklearn = importlib.util.find_spec("sklearn")
    table = np.loadtxt(Path(sklearn.origin).parent / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    images = np.round(table[:, :-1].reshape(-1, 8, 8, 1) * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    return ImageData(_resize(images, image_size), table[:, -1].astype(np.int32),
                     tuple(str(d) for d in range(10)), "sklearn digits")


def _npz(path: Path, image_size: int) -> ImageData:
    images, labels = _npz_members(path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{path}: 'images' must be uint8 NHWC with 1 or 3 channels, "
                        f"got {images.dtype} with shape {images.shape}")
    if len(images) == 0:
        raise DataError(f"{path}: 'images' is empty")
    names = None
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise DataError(f"{path}: 'labels' must be {len(images)} non-negative integers, "
                            f"got {labels.dtype} with shape {labels.shape}")
        labels = labels.astype(np.int32)
        names = tuple(str(c) for c in range(int(labels.max()) + 1))
    return ImageData(_resize(images, image_size), labels, names, str(path))


def _npz_members(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The file's 'images' and its 'labels' (None without), read here: np.load reads a member only when it
    is taken, so a damaged member, or one of Python objects (which would need pickle), fails inside this
    error handling rather than later with a traceback."""
    try:
        with np.load(path) as arrays:
            if "images" not in arrays.files:
                raise DataError(f"{path} has no 'images' array (found: {', '.join(arrays.files) or 'nothing'})")
            members = {}
            for name in ("images", "labels"):
                if name in arrays.files:
                    try:
                        members[name] = arrays[name]
                    except Exception as error:
                        raise DataError(f"cannot read {path}: its '{name}' array: {error}") from None
            return members["images"], members.get("labels")
    except DataError:
        raise
    except Exception as error:  # a truncated or foreign file
        raise DataError(f"cannot read {path}: {error}") from None


def _cifar10(folder: Path, image_size: int) -> ImageData:
    images, labels = [], []
    for i in range(1, 6):
        path = folder / f"data_batch_{i}"
        try:
            with open(path, "rb") as f:
                batch = _CifarUnpickler(f, encoding="bytes").load()
            images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], np.int32))
        except Exception as error:
            raise DataError(f"cannot read CIFAR-10 batch {path}: {error}") from None
    names = tuple(str(i) for i in range(10))
    meta = folder / "batches.meta"
    if meta.exists():
        try:
            with open(meta, "rb") as f:
                names = tuple(n.decode() for n in _CifarUnpickler(f, encoding="bytes").load()[b"label_names"])
        except Exception as error:
            raise DataError(f"cannot read CIFAR-10 labels {meta}: {error}") from None
    return ImageData(_resize(np.concatenate(images), image_size), np.concatenate(labels), names, str(folder))


class _CifarUnpickler(pickle.Unpickler):
    """The CIFAR-10 batches' pickles hold dicts, lists, bytes and numpy arrays: nothing else may be
    loaded, so a file that names any other callable (code to run) is refused instead of run."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch; refused")
        return super().find_class(module, name)


def _image_folder(folder: Path, image_size: int, skip_bad: bool) -> ImageFolder:
    """Lists the images (labels from sub-folder names; hidden files and folders left out) and reads
    each one's header for the channel count: colour if any is."""
    files = _image_files(folder)
    if not files:
        raise DataError(f"data folder {folder} holds no images (files Pillow reads: .png, .jpg, .webp, .bmp, .tif "
                        f"and {len(IMAGE_SUFFIXES) - 5} more suffixes; hidden files and folders are skipped)")
    parents = [os.path.relpath(os.path.dirname(f), folder) for f in files]
    class_names = tuple(sorted(set(parents)))
    labels, names = None, None
    if class_names != (".",):
        names = class_names
        index = {name: i for i, name in enumerate(names)}
        labels = np.asarray([index[p] for p in parents], np.int32)
    # Headers only, on a few threads (the files may sit on a network file system), each thread a slice
    # of the files: one task per file costs more than reading its header. An unreadable file is left
    # to fail (or be skipped) when training reads it.
    with concurrent.futures.ThreadPoolExecutor(HEADER_THREADS) as pool:
        modes = set().union(*pool.map(_header_modes, [files[i::HEADER_THREADS] for i in range(HEADER_THREADS)]))
    modes.discard(None)
    if not modes:
        with _opened(files[0]):  # none readable: say why, naming the first
            pass
    return ImageFolder(tuple(files), labels, names, str(folder), image_size,
                       "L" if modes <= GREY_MODES else "RGB", skip_bad)


HEADER_THREADS = 8


def _image_files(folder: Path) -> list[str]:
    """The image files under `folder`, sorted, following links; hidden files and folders left out. One
    directory listing per folder and no stat per file (the entries' types come with the listing)."""
    found, folders = [], [str(folder)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    folders.append(entry.path)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                    found.append(entry.path)
    return sorted(found)


def _header_modes(paths: list[str]) -> set[str | None]:
    return {_header_mode(path) for path in paths}


def _header_mode(path: str) -> str | None:
    """The image's mode from its header (no pixels decoded), None where it cannot be read. PNG and
    JPEG headers are read directly, a few bytes each (Image.open costs 0.3 ms a file, 6.5 s for 20,000)."""
    try:
        with open(path, "rb", buffering=0) as f:
            head = f.read(HEAD_BYTES)
            mode = _png_mode(head) or (_jpeg_mode(head, f) if head[:2] == b"\xff\xd8" else None)
        if mode is not None:
            return mode
        with Image.open(path) as image:
            return image.mode
    except (UnidentifiedImageError, OSError, ValueError):
        return None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_MODES = {0: "L", 4: "LA", 2: "RGB", 6: "RGBA"}  # IHDR colour type; palettes (3) are left to Pillow


def _png_mode(head: bytes) -> str | None:
    if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR" or len(head) < 26:
        return None
    return PNG_MODES.get(head[25])


HEAD_BYTES = 1024  # a PNG's IHDR; a JPEG's frame header unless EXIF data or a colour profile precede it
JPEG_MAX_SEGMENTS = 64  # a frame header further in is left to Pillow


def _jpeg_mode(head: bytes, f: BinaryIO) -> str | None:
    """From the frame header (SOFn) of the JPEG open in `f`, which starts with `head`: 1 component is
    grey, 3 or 4 colour. The segments before it (EXIF with its thumbnail, colour profiles: often tens of
    KB) are skipped by their lengths, not read."""
    position = 2
    for _ in range(JPEG_MAX_SEGMENTS):
        if position + 10 <= len(head):
            segment = head[position:position + 10]
        else:
            f.seek(position)
            segment = f.read(10)
        if len(segment) < 4 or segment[0] != 0xFF:
            return None
        marker = segment[1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return {1: "L", 3: "RGB", 4: "CMYK"}.get(segment[9]) if len(segment) == 10 else None
        position += 2 + int.from_bytes(segment[2:4], "big")
    return None


class _opened:
    """Image.open with any failure to read reported as DataError naming the file."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> Image.Image:
        try:
            self.image = Image.open(self.path)
            self.image.load()
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise DataError(f"cannot read image {self.path}: {error}") from None
        return self.image

    def __exit__(self, *exc) -> None:
        self.image.close()


def decode_image(path: str, image_size: int, mode: str) -> np.ndarray:
    """uint8 (image_size, image_size, channels): converted to `mode`, resized and centre-cropped."""
    with _opened(path) as image:
        array = _resize_center_crop(_eight_bit(image).convert(mode), image_size)
    return array[..., None] if array.ndim == 2 else array


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grey scaled to 8 bits (Pillow's own conversion clips it at 255); float grey read as [0, 1]."""
    if image.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(np.clip(np.round(np.asarray(image, np.float64) / 257.0), 0, 255).astype(np.uint8))
    if image.mode == "F":
        return Image.fromarray(np.clip(np.round(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8))
    return image


def _packed_records(folder: Path, image_size: int) -> PackedRecords:
    try:
        info = json.loads((folder / RECORDS_INFO).read_text())
        shape = tuple(info["image_shape"])
        paths = tuple(str(folder / name) for name in info["shards"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"cannot read {folder / RECORDS_INFO}: {error}") from None
    if shape[:2] != (image_size, image_size):
        raise DataError(f"{folder} holds {shape[0]}x{shape[1]} images, the model wants {image_size}x{image_size}: "
                        f"pack the source again with --image-size {image_size}")
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise DataError(f"{folder}: shard {missing[0]} is missing")
    names = None if info.get("class_names") is None else tuple(info["class_names"])
    return PackedRecords(paths, shape, names, str(folder))


# -- packing a source into ArrayRecord shards -----------------------------------------------------

def pack(source: str, out: str, image_size: int, examples_per_shard: int = 10_000,
         workers: int | None = None) -> dict:
    """Write `source` (anything `load` reads) as ArrayRecord shards in `out`, decoding on every core."""
    from array_record.python.array_record_module import ArrayRecordWriter

    data = load(source, image_size)
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new --out (nothing was written)")
    out_dir.mkdir(parents=True, exist_ok=True)
    count = len(data)
    num_shards = max(1, -(-count // examples_per_shard))
    shards = [f"data-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    start = time.time()
    # Sources that decode get a pool of processes, each handed the source once; the others are in memory.
    pool = None if data.in_memory else multiprocessing.get_context("spawn").Pool(
        workers or os.cpu_count(), initializer=_set_packing_source, initargs=(data,))
    if pool is None:
        _set_packing_source(data)
    try:
        for shard, name in enumerate(shards):
            writer = ArrayRecordWriter(str(out_dir / name), "group_size:1")
            indices = range(shard * examples_per_shard, min(count, (shard + 1) * examples_per_shard))
            for record in (map(_encode, indices) if pool is None else pool.imap(_encode, indices, chunksize=64)):
                writer.write(record)
            writer.close()
    finally:
        if pool is not None:
            pool.close()
    image_shape = [image_size, image_size, data.channels]
    info = {"format": "unet_flax records v1", "count": count, "image_shape": image_shape, "shards": shards,
            "class_names": None if data.class_names is None else list(data.class_names), "packed_from": source}
    (out_dir / RECORDS_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return {"out": str(out_dir), "count": count, "shards": num_shards, "image_shape": image_shape,
            "wall_s": round(time.time() - start, 2)}


_packing_source: Source | None = None


def _set_packing_source(data: Source) -> None:
    global _packing_source
    _packing_source = data


def _encode(index: int) -> bytes:
    example = _packing_source[index]
    return np.int32(example["label"]).astype("<i4").tobytes() + np.ascontiguousarray(example["image"]).tobytes()


# -- the grain pipeline ---------------------------------------------------------------------------

def _random_flip(example: Example, rng: np.random.Generator) -> Example:
    if rng.random() < 0.5:
        example = {**example, "image": example["image"][:, ::-1]}
    return example


def make_dataset(data: Source, global_batch: int, seed: int, hflip: bool = False,
                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Endless uint8 batches of this process's rows: element k is this process's share of global batch k."""
    if global_batch % process_count:
        raise DataError(f"batch size {global_batch} is not divisible by the {process_count} processes")
    local_batch = global_batch // process_count
    dataset = grain.MapDataset.source(data).shuffle(seed=seed).repeat(None)
    if hflip:
        dataset = dataset.random_map(_random_flip, seed=seed + 1)
    dataset = dataset.batch(local_batch, drop_remainder=True)
    return dataset.slice(slice(process_index, None, process_count)).map(_count_bad_images)


def _count_bad_images(batch: Example) -> Example:
    # One count per batch.
    return {**batch, "bad_images": np.int32(batch["bad_images"].sum())}


def default_workers(data: Source) -> int:
    """Worker processes for decoding: none for sources in memory (nothing to decode), else one per core."""
    return 0 if data.in_memory else min(os.cpu_count() or 1, 16)


def batches_from(dataset: grain.MapDataset, start: int, workers: int) -> Iterator[Example]:
    """Batches `start`, `start` + 1, ... of `dataset`, decoded by `workers` grain processes (0: here).
    The iterator has `close()`; its batches do not depend on `workers`."""
    # grain reads 500 elements ahead in 16 threads by default; an element here is a whole batch (one
    # of 64 images of 256 px is 12 MB: 6 GB ahead, in each worker). The device feed prefetches too.
    iterable = dataset.slice(slice(start, None)).to_iter_dataset(
        grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags, which only absl apps parse
            flags.FLAGS.mark_as_parsed()
        # Batches come back in shared memory (grain's default), not pickled through the workers' pipes:
        # a worker whose pipe holds a pickled batch nobody reads cannot exit, and closing waited 25 s
        # for each such worker (grain's kill timeout) before killing it.
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    batches = iter(iterable)
    if workers > 0:
        _WITH_WORKERS.add(batches)
    return batches


# Iterators with worker processes: a process that must end at once (a failed multi-process job) closes
# them first (close_worker_iterators).
_WITH_WORKERS: weakref.WeakSet = weakref.WeakSet()


def close_worker_iterators() -> None:
    """Stop the data workers and unlink the shared memory of the batches they sent, as a normal exit
    would: for a process that ends without one (os._exit), whose batches are never garbage collected.
    Else Python's resource tracker unlinks them later, with a warning after the process's last line."""
    for batches in list(_WITH_WORKERS):
        batches.close()
    for held in [obj for obj in gc.get_objects() if isinstance(obj, shared_memory.SharedMemory)]:
        with contextlib.suppress(FileNotFoundError):
            held.unlink()


if __name__ == "__main__":  # the command of earlier releases; see unet_flax.moved
    import sys

    from unet_flax.moved import run_moved_command

    sys.exit(run_moved_command("unet_flax.input_pipeline"))
