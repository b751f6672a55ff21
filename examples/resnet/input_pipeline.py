"""Data for the training program: the embedded digits set, an ImageNet-layout folder, or
synthetic images; and the loaders that turn any of them into per-step batches.

Batches are deterministic functions of (seed, step): the epoch's order comes from
(seed, epoch) and each image's augmentation from (seed, step, example index), so a run
resumed from a checkpoint at step s sees exactly the batches an uninterrupted run sees,
and a multi-process run, where every process builds only its own rows of each global
batch, sees the batches of a single process.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import queue
import threading
from typing import Iterator

import numpy as np

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class DataError(ValueError):
    """A problem with the training data that the user must fix (message says how)."""


# ---------------------------------------------------------------------------------------
# Sources: random access to (image, label) by index. `load(indices, step, train)` returns
# float32 images (N, H, W, C) and int32 labels (N,).


class DigitsSource:
    """scikit-learn's handwritten digits (1797 8x8 grey images, 10 classes), shipped inside
    the scikit-learn package: no download. A stratified 80/20 split (fixed, seed 0) gives
    1437 training and 360 held-out images; pixels are standardised with the training
    split's mean and deviation and resized (bilinear) to `image_size` when it is not 8.
    """

    name = "digits"
    num_classes = 10

    def __init__(self, split: str, image_size: int = 8):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = digits.images.astype(np.float32) / 16.0
        y = digits.target.astype(np.int32)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.2, random_state=0, stratify=y
        )
        mean, std = x_train.mean(), x_train.std()
        x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
        x = ((x - mean) / std)[..., None]
        if image_size != x.shape[1]:
            x = _resize_bilinear(x, image_size)
        self.images, self.labels = np.ascontiguousarray(x), y
        self.image_shape = self.images.shape[1:]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices, step: int, train: bool):
        del step, train
        return self.images[indices], self.labels[indices]


class SyntheticSource:
    """Random images and labels for measuring throughput at any size: a fixed pool of
    `pool` images, so producing a batch costs a copy, not a random draw. The source
    counts `size` images (at least the pool), which an epoch runs through; example i is
    pool image i mod pool, so any batch size works."""

    name = "synthetic"

    def __init__(
        self, image_size: int, num_classes: int, seed: int = 0, pool: int = 512, size: int = 0
    ):
        rng = np.random.default_rng(seed)
        self.num_classes = num_classes
        self.images = rng.standard_normal((pool, image_size, image_size, 3), np.float32)
        self.labels = rng.integers(0, num_classes, pool).astype(np.int32)
        self.image_shape = self.images.shape[1:]
        self.size = max(pool, size)

    def __len__(self) -> int:
        return self.size

    def load(self, indices, step: int, train: bool):
        del step, train
        indices = np.asarray(indices) % len(self.labels)
        return self.images[indices], self.labels[indices]


class FolderSource:
    """An ImageNet-layout folder split: `<root>/<split>/<class>/<image>`.

    Training images get a random-resized crop (scale 0.08-1, aspect 3/4-4/3) and a random
    horizontal flip; evaluation images are resized so the short side is image_size/0.875
    and centre-cropped. Both are normalised with the ImageNet mean and deviation.
    """

    name = "folder"

    def __init__(self, root, split: str, image_size: int, classes=None, seed: int = 0):
        root = pathlib.Path(root)
        folder = root / split
        if not root.is_dir():
            raise DataError(f"--data-dir {str(root)!r} is not a folder")
        if not folder.is_dir():
            raise DataError(
                f"--data-dir {str(root)!r} has no {split}/ folder; expected the ImageNet "
                f"layout {split}/<class>/<image>"
            )
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise DataError(
                    f"{folder} has classes the train/ folder lacks: {unknown[:5]}"
                    + (" ..." if len(unknown) > 5 else "")
                )
        if not classes:
            raise DataError(
                f"{folder} has no class folders; expected {split}/<class>/<image> "
                f"(suffixes {', '.join(IMAGE_SUFFIXES)})"
            )
        index = {c: i for i, c in enumerate(classes)}
        paths, labels = [], []
        for c in found:
            for p in sorted((folder / c).iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                    paths.append(p)
                    labels.append(index[c])
        if not paths:
            raise DataError(
                f"{folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)} files "
                f"in {len(found)} class folders)"
            )
        self.classes = list(classes)
        self.num_classes = len(classes)
        self.paths = paths
        self.labels = np.asarray(labels, np.int32)
        self.image_size = image_size
        self.image_shape = (image_size, image_size, 3)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def load_one(self, i: int, step: int, train: bool) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if train:
                    # Drawn from the example, not its row in this process's share of the
                    # batch: the same crop and flip with any number of processes.
                    rng = np.random.default_rng((self.seed, step, i))
                    im = _random_resized_crop(im, self.image_size, rng)
                else:
                    im = _center_crop(im, self.image_size)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        x = np.asarray(im, np.float32) / 255.0
        return (x - IMAGENET_MEAN) / IMAGENET_STD

    def load(self, indices, step: int, train: bool, pool=None):
        def one(i):
            return self.load_one(int(i), step, train)

        jobs = list(indices)
        images = list(pool.map(one, jobs)) if pool is not None else [one(j) for j in jobs]
        return np.stack(images), self.labels[np.asarray(indices)]


def _resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((x.shape[0], size, size, x.shape[3]), np.float32)
    for n in range(x.shape[0]):
        for c in range(x.shape[3]):
            im = Image.fromarray(x[n, :, :, c], mode="F")
            out[n, :, :, c] = np.asarray(im.resize((size, size), Image.BILINEAR))
    return out


def _random_resized_crop(im, size: int, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    from PIL import Image

    w, h = im.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        cw = int(round(np.sqrt(target * aspect)))
        ch = int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            break
    else:  # fall back to the whole image's central square
        cw = ch = min(w, h)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    im = im.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.uniform() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return im


def _center_crop(im, size: int, crop_fraction: float = 0.875):
    from PIL import Image

    w, h = im.size
    short = max(1, int(round(size / crop_fraction)))
    if w <= h:
        nw, nh = short, max(1, int(round(h * short / w)))
    else:
        nw, nh = max(1, int(round(w * short / h))), short
    im = im.resize((nw, nh), Image.BILINEAR)
    x0, y0 = (nw - size) // 2, (nh - size) // 2
    return im.crop((x0, y0, x0 + size, y0 + size))


# ---------------------------------------------------------------------------------------
# Loaders.


def steps_per_epoch(source, global_batch: int) -> int:
    return len(source) // global_batch


def train_indices(n: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """The example indices of global batch `step` (epochs drop their last partial batch)."""
    per_epoch = n // global_batch
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(n)
    return order[i * global_batch : (i + 1) * global_batch]


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


class TrainLoader:
    """Background producer of this process's rows of each global training batch.

    A thread assembles batches `prefetch` steps ahead into a bounded queue; a folder
    source decodes and augments its images on `workers` threads (PIL releases the GIL
    while decoding and resizing). Errors (an unreadable image) are re-raised in the
    consumer, naming the file.
    """

    def __init__(
        self,
        source,
        global_batch: int,
        *,
        seed: int,
        start_step: int,
        total_steps: int,
        process_index: int = 0,
        process_count: int = 1,
        workers: int = 0,
        prefetch: int = 2,
    ):
        self.source = source
        self.global_batch = global_batch
        self.seed = seed
        self.rows = process_rows(global_batch, process_index, process_count)
        self.steps = range(start_step, total_steps)
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode")
            if workers > 0 and hasattr(source, "load_one")
            else None
        )
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="loader", daemon=True)
        self._thread.start()

    def batch(self, step: int):
        idx = train_indices(len(self.source), self.global_batch, self.seed, step)[self.rows]
        if self._pool is not None:
            return self.source.load(idx, step, True, pool=self._pool)
        return self.source.load(idx, step, True)

    def _produce(self):
        try:
            for step in self.steps:
                item = (step, self.batch(step))
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._queue.put((None, e))

    def __iter__(self) -> Iterator:
        for _ in self.steps:
            step, item = self._queue.get()
            if step is None:
                raise item
            yield step, item

    def close(self):
        self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def eval_batches(
    source, global_batch: int, *, process_index: int = 0, process_count: int = 1, workers: int = 0
):
    """This process's rows of each evaluation batch, padded: (images, labels, mask)."""
    n = len(source)
    rows = process_rows(global_batch, process_index, process_count)
    pool = (
        concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode")
        if workers > 0 and hasattr(source, "load_one")
        else None
    )
    try:
        for start in range(0, n, global_batch):
            idx = np.arange(start, start + global_batch)[rows]
            mask = idx < n
            idx = np.where(mask, idx, 0)
            if pool is not None:
                images, labels = source.load(idx, 0, False, pool=pool)
            else:
                images, labels = source.load(idx, 0, False)
            yield images, labels, mask
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))
