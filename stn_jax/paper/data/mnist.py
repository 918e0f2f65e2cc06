"""MNIST sources: tensorflow-datasets, or a folder of the four original IDX files.

``load_mnist(source, split)`` returns the split as NumPy arrays, images
``uint8 (N, 28, 28)`` and labels ``int64 (N,)``, in the source's own order
(the IDX files' original order; tfds' fixed shuffled order). The pipeline
(`stn_jax.paper.data.pipeline`) puts every source into one canonical order, so both
sources give the same data sets.

* ``source="tfds"``: `tensorflow_datasets` (``mnist`` builder). On a machine with
  internet tfds downloads and prepares MNIST under ``data_dir`` (default
  ``~/tensorflow_datasets``). Offline, give it the four original files as its
  *manual download* (``manual_dir``, ``config.data.tfds_manual_dir``): tfds checks
  their sizes and SHA-256 and prepares from them. Without network tfds would
  retry for minutes before failing, so we check first (prepared data, manual
  files, a 2-second connection test) and fail at once with a message that names
  the offline options.
* any other ``source``: a folder holding ``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
  ``t10k-labels-idx1-ubyte.gz`` (uncompressed copies without ``.gz`` work too).
  A missing or malformed file raises `MnistSourceError` naming the file and how
  to get MNIST.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import socket
import threading
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NUM_EXAMPLES = {"train": 60_000, "test": 10_000}
# SHA-256 of the original files (also the values tensorflow-datasets registers).
SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
# Where tfds downloads MNIST from (the CVDF mirror of yann.lecun.com/exdb/mnist).
TFDS_DOWNLOAD_HOST = "storage.googleapis.com"
TFDS_DOWNLOAD_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"

HOW_TO_GET = (
    "How to get MNIST: download the four files train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (e.g. from " + TFDS_DOWNLOAD_URL + " or "
    "https://ossci-datasets.s3.amazonaws.com/mnist/) into one folder and pass it as "
    "--config.data.source=/path/to/mnist; or use --config.data.source=tfds on a machine with internet "
    "(tensorflow-datasets downloads it). In this project's checkout, ../shared/data/mnist is such a folder.")


class MnistSourceError(RuntimeError):
    """MNIST could not be read: the message names the file or option and how to fix it."""


# ----------------------------------------------------------------------------
# IDX folder.
# ----------------------------------------------------------------------------


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / name[:-3]):  # .gz or uncompressed
        if candidate.is_file():
            return candidate
    raise MnistSourceError(f"MNIST file {name} is missing from {folder} (looked for {name} and "
                           f"{name[:-3]}). {HOW_TO_GET}")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise MnistSourceError(f"MNIST file {path} is corrupt or unreadable ({type(e).__name__}: {e}). "
                               f"{HOW_TO_GET}") from None


def parse_idx(data: bytes, expected_magic: int, name: str) -> np.ndarray:
    """Parses an IDX byte string (unsigned bytes): images ``(N, rows, cols)`` (magic 2051) or labels ``(N,)`` (2049)."""
    ndim = expected_magic & 0xFF
    if len(data) < 4 + 4 * ndim:
        raise MnistSourceError(f"MNIST file {name} is corrupt: only {len(data)} bytes. {HOW_TO_GET}")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise MnistSourceError(f"MNIST file {name} is corrupt: magic number {magic}, expected {expected_magic}. "
                               f"{HOW_TO_GET}")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise MnistSourceError(f"MNIST file {name} is corrupt: header says shape {shape} "
                               f"({int(np.prod(shape))} bytes), the file holds {len(body)}. {HOW_TO_GET}")
    return np.frombuffer(body, np.uint8).reshape(shape)


def check_folder(folder: str | os.PathLike) -> Path:
    """Raises `MnistSourceError` naming the first of the four files missing from ``folder``."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise MnistSourceError(f"MNIST folder {path} does not exist (config.data.source is either 'tfds' or a "
                               f"folder with the four MNIST files). {HOW_TO_GET}")
    for split in SPLITS:
        for name in FILES[split]:
            _find(path, name)
    return path


@functools.lru_cache(maxsize=8)
def _load_idx_cached(folder: str, split: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    del stamp  # part of the cache key only: a changed file is read again
    folder_path = Path(folder)
    image_name, label_name = FILES[split]
    image_path, label_path = _find(folder_path, image_name), _find(folder_path, label_name)
    image_bytes = _read_bytes(image_path)
    label_bytes = _read_bytes(label_path)
    images = parse_idx(image_bytes, 2051, str(image_path))
    labels = parse_idx(label_bytes, 2049, str(label_path)).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise MnistSourceError(f"MNIST file {image_path}: images are {images.shape[1:]}, expected 28x28. {HOW_TO_GET}")
    if len(images) != len(labels):
        raise MnistSourceError(f"MNIST files {image_path} and {label_path} disagree: {len(images)} images, "
                               f"{len(labels)} labels. {HOW_TO_GET}")
    if labels.size and labels.max() > 9:
        raise MnistSourceError(f"MNIST file {label_path} is corrupt: label {labels.max()} > 9. {HOW_TO_GET}")
    if len(images) != NUM_EXAMPLES[split]:
        log.warning("%s holds %d examples, the MNIST %s split has %d", image_path, len(images), split,
                    NUM_EXAMPLES[split])
    for path in (image_path, label_path):
        if path.suffix == ".gz" and path.name in SHA256:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != SHA256[path.name]:
                log.warning("%s is readable but is not the original MNIST file (SHA-256 %s, expected %s)",
                            path, digest, SHA256[path.name])
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_idx_folder(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split from a folder of MNIST IDX files (parsed once per process and cached)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = check_folder(folder).resolve()
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in (_find(path, n) for n in FILES[split]))
    return _load_idx_cached(str(path), split, stamp)


# ----------------------------------------------------------------------------
# tensorflow-datasets.
# ----------------------------------------------------------------------------


def network_available(host: str = TFDS_DOWNLOAD_HOST, port: int = 443, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds (DNS lookup included)."""
    result = []

    def attempt():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # a hanging DNS lookup is abandoned, not waited for
    return bool(result and result[0])


def _manual_files_present(folder: Path | None) -> list[str]:
    """The registered MNIST file names missing from ``folder`` (all of them when it is None)."""
    names = [n for split in SPLITS for n in FILES[split]]
    if folder is None:
        return names
    return [n for n in names if not (folder / n).is_file()]


def _offline_error(data_dir: str, manual_dir: Path | None) -> MnistSourceError:
    where = (f"the manual folder {manual_dir} lacks {', '.join(_manual_files_present(manual_dir))}"
             if manual_dir is not None else "no manual folder is configured (config.data.tfds_manual_dir)")
    return MnistSourceError(
        f"tensorflow-datasets cannot get MNIST: it is not prepared in {data_dir}, {where}, and "
        f"{TFDS_DOWNLOAD_HOST} cannot be reached (no network), so a download would only retry for minutes. "
        "Offline, either read the IDX files directly with --config.data.source=/path/to/mnist (a folder with "
        "the four original .gz files, e.g. ../shared/data/mnist in this project), or keep "
        "--config.data.source=tfds and add --config.data.tfds_manual_dir=/path/to/mnist so that tfds prepares "
        f"MNIST from those files. {HOW_TO_GET}")


def load_tfds_mnist(split: str, data_dir: str | None = None, manual_dir: str | None = None,
                    max_examples_per_split: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads a split through tensorflow-datasets, preparing it first if needed.

    Args:
      split: ``"train"`` or ``"test"``.
      data_dir: tfds data directory (default: tfds' own, ``~/tensorflow_datasets``).
      manual_dir: a folder with the four original MNIST files; tfds verifies and
        uses them instead of downloading (``DownloadConfig(manual_dir=...)``).
      max_examples_per_split: prepare only this many examples per split (tests).

    Raises:
      MnistSourceError: at once (no tfds retries) when MNIST is not prepared,
        no manual files are given and the download host cannot be reached.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MnistSourceError(f"config.data.source='tfds' needs tensorflow-datasets ({e}); install "
                               f"tensorflow-cpu, tensorflow-datasets, pillow and importlib_resources "
                               f"(requirements.txt), or use an IDX folder. {HOW_TO_GET}") from e
    builder = tfds.builder("mnist", data_dir=data_dir)
    resolved_data_dir = str(Path(builder.data_dir).parent.parent)
    if not builder.is_prepared():
        manual = Path(manual_dir).expanduser() if manual_dir else None
        if manual is not None and not manual.is_dir():
            raise MnistSourceError(f"config.data.tfds_manual_dir={manual_dir!r} is not a folder. {HOW_TO_GET}")
        default_manual = Path(resolved_data_dir) / "downloads" / "manual"
        have_manual = manual is not None and not _manual_files_present(manual)
        have_default_manual = not _manual_files_present(default_manual)
        if manual is not None and not have_manual:
            missing = _manual_files_present(manual)
            raise MnistSourceError(f"MNIST file {missing[0]} is missing from the tfds manual folder {manual} "
                                   f"(missing: {', '.join(missing)}). {HOW_TO_GET}")
        if not (have_manual or have_default_manual) and not network_available():
            raise _offline_error(resolved_data_dir, manual)
        kwargs = {}
        if have_manual:
            kwargs.update(manual_dir=str(manual), try_download_gcs=False)
        elif have_default_manual:
            kwargs.update(try_download_gcs=False)  # tfds finds <data_dir>/downloads/manual by itself
        if max_examples_per_split is not None:
            kwargs.update(max_examples_per_split=int(max_examples_per_split))
        log.info("preparing tfds mnist in %s%s", resolved_data_dir, f" from {manual}" if have_manual else "")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**kwargs))
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images = np.asarray(arrays["image"], np.uint8)[..., 0]
    labels = np.asarray(arrays["label"], np.int64)
    return images, labels


# ----------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------


def load_mnist(source: str, split: str, data_dir: str | None = None, *,
               manual_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One MNIST split as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    Args:
      source: ``"tfds"`` for tensorflow-datasets, or a folder of the four IDX files.
      split: ``"train"`` or ``"test"``.
      data_dir: tfds data directory (``source="tfds"`` only; None = tfds' default).
      manual_dir: folder of the original files that tfds uses as its manual
        download (``source="tfds"`` only).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not source:
        raise MnistSourceError(f"config.data.source is empty: set it to 'tfds' or to a folder. {HOW_TO_GET}")
    if source == "tfds":
        return load_tfds_mnist(split, data_dir or None, manual_dir or None)
    return load_idx_folder(source, split)
