"""Where the datasets' files are: Fashion-MNIST offline, CIFAR through torchvision.

:func:`fashion_mnist_root` finds Fashion-MNIST's four IDX files (an explicit folder,
``$SUBSPACES_DATA``, the Debian package ``dataset-fashion-mnist``, the user cache, or a
torchvision download) and :func:`load_fashion_mnist` / :func:`load_cifar` read a dataset's
images and labels as tensors. Set ``SUBSPACES_OFFLINE=1`` to skip every download attempt.
Nothing is read at import time; the environment variables are read on every call.
torchvision is imported inside the readers: it is needed only when a dataset is read.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pathlib
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping

import torch

from .errors import DatasetNotFoundError

#: Where the Debian package ``dataset-fashion-mnist`` puts the four gzipped IDX files.
#: Read at call time (tests monkeypatch it).
DEBIAN_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

# Uncompressed IDX file name -> (magic number, number of items).
_FMNIST_FILES: dict[str, tuple[int, int]] = {
    "train-images-idx3-ubyte": (2051, 60000),
    "train-labels-idx1-ubyte": (2049, 60000),
    "t10k-images-idx3-ubyte": (2051, 10000),
    "t10k-labels-idx1-ubyte": (2049, 10000),
}
_FMNIST_SIDE = 28

# --------------------------------------------------------------------------- #
# Environment helpers (read at call time, never cached)
# --------------------------------------------------------------------------- #
def cache_dir() -> pathlib.Path:
    """$SUBSPACES_CACHE, else $XDG_CACHE_HOME/subspaces, else ~/.cache/subspaces."""
    env = os.environ.get("SUBSPACES_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return pathlib.Path(xdg).expanduser() / "subspaces"
    return pathlib.Path.home() / ".cache" / "subspaces"


def data_env() -> pathlib.Path | None:
    env = os.environ.get("SUBSPACES_DATA")
    return pathlib.Path(env).expanduser() if env else None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def offline() -> bool:
    return os.environ.get("SUBSPACES_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- #
# Fashion-MNIST discovery
# --------------------------------------------------------------------------- #
def _idx_file_ok(path: pathlib.Path, name: str) -> bool:
    """True when ``path`` is a complete uncompressed IDX file of the expected kind/size."""
    magic, count = _FMNIST_FILES[name]
    is_images = magic == 2051
    header = 16 if is_images else 8
    expected = header + count * (_FMNIST_SIDE * _FMNIST_SIDE if is_images else 1)
    try:
        if path.stat().st_size != expected:
            return False
        with open(path, "rb") as fh:
            head = fh.read(header)
    except OSError:
        return False
    if is_images:
        return struct.unpack(">IIII", head) == (magic, count, _FMNIST_SIDE, _FMNIST_SIDE)
    return struct.unpack(">II", head) == (magic, count)


def _raw_complete(root: pathlib.Path) -> bool:
    raw = root / "FashionMNIST" / "raw"
    return all(_idx_file_ok(raw / name, name) for name in _FMNIST_FILES)


def _find_sources(folder: pathlib.Path) -> dict[str, pathlib.Path] | None:
    """Map each IDX name to a usable file (uncompressed or ``.gz``) in ``folder`` or
    ``folder/FashionMNIST/raw``; ``None`` unless all four are present."""
    found: dict[str, pathlib.Path] = {}
    dirs = (folder / "FashionMNIST" / "raw", folder)
    for name in _FMNIST_FILES:
        for d in dirs:
            if _idx_file_ok(d / name, name):
                found[name] = d / name
                break
            if (d / f"{name}.gz").is_file():
                found[name] = d / f"{name}.gz"
                break
        else:
            return None
    return found


@contextlib.contextmanager
def _dir_lock(directory: pathlib.Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``directory/.lock`` (no-op where fcntl is missing).

    Only an optimisation (ranks wait instead of all decompressing): correctness comes
    from writing to a temporary file and ``os.replace``-ing it into place."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(directory / ".lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _install_fmnist(sources: Mapping[str, pathlib.Path], cache: pathlib.Path) -> pathlib.Path:
    """Write the four uncompressed IDX files into ``cache/FashionMNIST/raw`` (each via a
    temporary file + ``os.replace``; files already complete are left untouched)."""
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    with _dir_lock(raw):
        for name, src in sources.items():
            dest = raw / name
            if _idx_file_ok(dest, name):
                continue
            fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=raw)
            tmp = pathlib.Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out:
                    opener = gzip.open if src.suffix == ".gz" else open
                    with opener(src, "rb") as inp:
                        shutil.copyfileobj(inp, out, length=1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                if not _idx_file_ok(tmp, name):
                    raise OSError(f"{src} does not contain a valid {name} IDX file")
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
    return cache


def _download_fmnist(cache: pathlib.Path) -> pathlib.Path:
    """torchvision download into a private temp dir, then atomic install into the cache."""
    from torchvision.datasets import FashionMNIST

    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache) as tmp:
        FashionMNIST(tmp, train=True, download=True)
        sources = _find_sources(pathlib.Path(tmp))
        if sources is None:
            raise RuntimeError("torchvision download finished but the IDX files are missing")
        return _install_fmnist(sources, cache)


def _try_folder(folder: pathlib.Path, cache: pathlib.Path, label: str, tried: list[str]) -> pathlib.Path | None:
    if not folder.is_dir():
        tried.append(f"{label} {folder}: no such directory")
        return None
    if _raw_complete(folder):
        return folder
    sources = _find_sources(folder)
    if sources is None:
        tried.append(
            f"{label} {folder}: neither FashionMNIST/raw/<4 IDX files> nor the four *-ubyte.gz files"
        )
        return None
    try:
        return _install_fmnist(sources, cache)
    except (OSError, EOFError, zlib.error) as exc:  # unwritable cache, corrupt/truncated .gz
        tried.append(f"{label} {folder}: found files but could not install them into {cache}: {exc}")
        return None


def fashion_mnist_root(root: str | os.PathLike | None = None) -> pathlib.Path:
    """Return a directory ``ROOT`` such that ``torchvision.datasets.FashionMNIST(ROOT,
    download=False)`` works, i.e. ``ROOT/FashionMNIST/raw/`` holds the four uncompressed
    IDX files (train: 60000 x 28 x 28 uint8 images + 60000 labels; t10k: 10000 of each).

    Search order (first hit wins):

    1. ``root`` if given, 2. ``$SUBSPACES_DATA``: each may be a folder with
       ``FashionMNIST/raw/`` (returned as is when it holds the uncompressed files) or a
       folder with the four ``*-ubyte.gz`` files (decompressed into the cache);
    3. the cache ``CACHE/FashionMNIST/raw`` when already complete, where ``CACHE`` is
       ``$SUBSPACES_CACHE``, else ``$XDG_CACHE_HOME/subspaces``, else ``~/.cache/subspaces``;
    4. the Debian package files ``DEBIAN_FASHION_MNIST_DIR/*.gz``
       (``/usr/share/datasets/fashion-mnist``), decompressed once into the cache;
    5. torchvision's download into the cache (skipped when ``SUBSPACES_OFFLINE=1``).

    Cache files are written to a temporary file and ``os.replace``-d into place under an
    inter-process file lock, so killed or concurrent processes (DDP ranks) are safe; files
    already complete are never rewritten.

    Raises:
        DatasetNotFoundError: naming every place looked at and how to fix it.
    """
    cache = cache_dir()
    tried: list[str] = []

    if root is not None:
        hit = _try_folder(pathlib.Path(root).expanduser(), cache, "root argument", tried)
        if hit is not None:
            return hit
    env = data_env()
    if env is None:
        tried.append("$SUBSPACES_DATA: not set")
    else:
        hit = _try_folder(env, cache, "$SUBSPACES_DATA", tried)
        if hit is not None:
            return hit

    if _raw_complete(cache):
        return cache
    tried.append(f"cache {cache / 'FashionMNIST' / 'raw'}: incomplete or missing")

    debian = pathlib.Path(DEBIAN_FASHION_MNIST_DIR)
    hit = _try_folder(debian, cache, "Debian package dir", tried)
    if hit is not None:
        return hit

    if offline():
        tried.append("torchvision download: skipped because SUBSPACES_OFFLINE is set")
    else:
        try:
            return _download_fmnist(cache)
        except Exception as exc:  # network errors come in many types (URLError, RuntimeError, ...)
            tried.append(f"torchvision download into {cache}: failed ({first_line(exc)})")

    names = ", ".join(f"{n}.gz" for n in _FMNIST_FILES)
    raise DatasetNotFoundError(
        "Fashion-MNIST not found. Looked at:\n"
        + "".join(f"  - {t}\n" for t in tried)
        + "Fix one of:\n"
        "  * sudo apt-get install dataset-fashion-mnist   "
        f"(provides {debian}/*.gz; decompressed automatically into {cache})\n"
        "  * export SUBSPACES_DATA=/path/to/folder containing FashionMNIST/raw/ "
        f"(the four uncompressed IDX files) or the four .gz files ({names})\n"
        f"  * allow network access so torchvision can download into {cache} "
        "(and unset SUBSPACES_OFFLINE); set SUBSPACES_CACHE to choose another writable cache"
    )



def load_fashion_mnist(root):
    from torchvision.datasets import FashionMNIST

    base = fashion_mnist_root(root)
    tr = FashionMNIST(str(base), train=True, download=False)
    te = FashionMNIST(str(base), train=False, download=False)
    return (tr.data.unsqueeze(1), tr.targets.to(torch.int64),
            te.data.unsqueeze(1), te.targets.to(torch.int64))


def load_cifar(name: str, root):
    """Find CIFAR in ``root`` (else ``$SUBSPACES_DATA``, then the cache) or download it
    into ``root`` (else the cache) via a temp dir + atomic rename."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    if root is not None:
        candidates = [pathlib.Path(root).expanduser()]
    else:
        env = data_env()
        candidates = ([env] if env is not None else []) + [cache_dir()]
    target = candidates[-1] if root is None else candidates[0]

    def load(where: pathlib.Path):
        return cls(str(where), train=True, download=False), cls(str(where), train=False, download=False)

    tried: list[str] = []
    for where in candidates:
        try:
            tr, te = load(where)
            break
        except (RuntimeError, OSError) as exc:
            tried.append(f"{where / cls.base_folder}: {first_line(exc)}")
    else:
        tr = te = None
        if offline():
            tried.append("download: skipped because SUBSPACES_OFFLINE is set")
        else:
            try:
                target.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(prefix=".download-", dir=target) as tmp:
                    cls(tmp, train=True, download=True)
                    with contextlib.suppress(OSError):  # another process may have won the race
                        os.replace(pathlib.Path(tmp) / cls.base_folder, target / cls.base_folder)
                tr, te = load(target)
            except Exception as exc:  # URLError, RuntimeError, PermissionError, ...
                tried.append(f"torchvision download into {target}: failed ({first_line(exc)})")
        if tr is None:
            raise DatasetNotFoundError(
                f"{name} not found and could not be downloaded. Looked at:\n"
                + "".join(f"  - {t}\n" for t in tried)
                + f"Fix: run once with network access (downloads into {target}), or copy an existing "
                f"'{cls.base_folder}' folder (from torchvision.datasets.{cls.__name__}) into a folder "
                "passed as root= or set as $SUBSPACES_DATA. A partial folder left by an interrupted "
                "download must be deleted first."
            )
    images = torch.from_numpy(tr.data.transpose(0, 3, 1, 2))  # contiguous [N, 3, 32, 32]
    test_images = torch.from_numpy(te.data.transpose(0, 3, 1, 2))
    return (images, torch.as_tensor(tr.targets, dtype=torch.int64),
            test_images, torch.as_tensor(te.targets, dtype=torch.int64), len(tr.classes))
