"""MRC maps and image stacks: read, memory-map and write them safely.

Conventions (see ``docs/conventions.md``)
-----------------------------------------
* Maps are float32 ``(N, N, N)`` arrays indexed ``[z, y, x]``; stacks are
  ``(n, N, N)`` indexed ``[i, y, x]`` (a single 2D image is a stack of one).
* The pixel size is the header's voxel size along x, in Angstrom.
* Every bad file raises :class:`~.errors.InputError` naming the file, the
  problem and the fix, from the header alone where possible, so that callers
  can check their inputs before any long work.
* Every write is atomic: the file is written under a temporary name in the
  destination folder and renamed with :func:`os.replace` when complete, so a
  crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from .errors import InputError

__all__ = [
    "read_map",
    "write_map",
    "stack_info",
    "open_stack",
    "write_stack",
    "StackWriter",
]

log = logging.getLogger(__name__)

#: Size of the fixed MRC header in bytes; the extended header follows it.
_HEADER_BYTES = 1024


def _require_file(path: Path) -> None:
    if not path.exists():
        raise InputError(
            path, "file not found", "check the path and the current directory"
        )
    if not path.is_file():
        raise InputError(path, "is not a regular file", "give the path of an MRC file")


@contextmanager
def _translated_mrc_errors(path: Path):
    """Turn mrcfile's exceptions and warnings into :class:`InputError`.

    mrcfile warns (rather than raises) about some header oddities; such
    warnings are logged, not raised, because the header fields we use are
    validated separately.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except InputError:
            raise
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(
                path,
                f"not a readable MRC file ({exc})",
                "check that the file is a complete MRC/MRCS file "
                "(re-copy or re-export it)",
            ) from exc
    for w in caught:
        log.warning("%s: %s", path, w.message)


def _read_header(path: Path):
    """The header of an MRC file (a NumPy record), after existence checks."""
    _require_file(path)
    with _translated_mrc_errors(path):
        with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
            header = None if mrc.header is None else mrc.header.copy()
    if header is None or bytes(header.map) != b"MAP ":
        raise InputError(
            path,
            "not an MRC file (no 'MAP ' identifier in the header)",
            "give an MRC map or an MRCS stack",
        )
    return header


def _layout(path: Path, header) -> tuple[np.dtype, tuple[int, int, int], int]:
    """Data dtype, ``(nz, ny, nx)`` shape and byte offset of the data block."""
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except ValueError as exc:
        raise InputError(
            path,
            f"unsupported MRC data mode {int(header.mode)}",
            "convert the file to float32 (mode 2)",
        ) from exc
    shape = (int(header.nz), int(header.ny), int(header.nx))
    if min(shape) < 1:
        raise InputError(
            path,
            f"header has an empty data block (nz, ny, nx) = {shape}",
            "re-export the file",
        )
    offset = _HEADER_BYTES + int(header.nsymbt)
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise InputError(
            path,
            f"file is truncated: {size} bytes, but the header (nz, ny, nx) = {shape}, "
            f"mode {int(header.mode)} needs {expected} bytes",
            "re-copy or re-export the file (an interrupted transfer or write?)",
        )
    return dtype, shape, offset


def _pixel_size_a(header) -> float:
    """Voxel size along x in Angstrom (``cella.x / mx``); 0 when undefined."""
    mx = int(header.mx)
    return float(header.cella.x) / mx if mx > 0 else 0.0


def read_map(path) -> tuple[np.ndarray, float]:
    """Read a cubic 3D map.

    Parameters
    ----------
    path : str or Path
        An MRC file holding one cubic volume.

    Returns
    -------
    volume : ndarray, shape (N, N, N), float32
        Indexed ``[z, y, x]``.
    pixel_size_a : float
        Voxel size along x from the header, in Angstrom.

    Raises
    ------
    InputError
        Missing, truncated or non-MRC file; a map that is not a cubic volume;
        NaN or infinite values; pixel size 0 in the header.
    """
    path = Path(path)
    header = _read_header(path)
    dtype, shape, offset = _layout(path, header)
    if shape[0] == 1 or len(set(shape)) != 1:
        raise InputError(
            path,
            f"map is not a cubic volume: (nz, ny, nx) = {shape}",
            "resize or pad the map to a cubic box "
            "(e.g. relion_image_handler --new_box)",
        )
    pixel_size = _pixel_size_a(header)
    if not pixel_size > 0:
        raise InputError(
            path,
            f"pixel size in the header is {pixel_size:g} A",
            "set the pixel size in the header, e.g. relion_image_handler --i map.mrc "
            "--o fixed.mrc --force_header_angpix 1.05 (your pixel size in A)",
        )
    data = np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset)
    volume = data.reshape(shape).astype(np.float32)
    bad = np.count_nonzero(~np.isfinite(volume))
    if bad:
        raise InputError(
            path,
            f"map has {bad} NaN or infinite values",
            "regenerate the map, or replace the bad voxels (e.g. by 0) before using it",
        )
    return volume, pixel_size


def _square_stack_layout(path: Path):
    """Header, data type, shape ``(n, N, N)`` and data offset of a stack of square images."""
    header = _read_header(path)
    dtype, (nz, ny, nx), offset = _layout(path, header)
    if ny != nx:
        raise InputError(
            path,
            f"images are not square: (ny, nx) = ({ny}, {nx})",
            "re-extract square particle images",
        )
    return header, dtype, (nz, ny, nx), offset


def stack_info(path) -> tuple[int, int, float]:
    """Number of images, box size and pixel size of a stack, from its header only.

    Parameters
    ----------
    path : str or Path
        An MRC/MRCS stack of square images (or a single 2D image).

    Returns
    -------
    n : int
        Number of images (1 for a single 2D image).
    box : int
        Image size in pixels.
    pixel_size_a : float
        Header pixel size in Angstrom (0.0 when the header does not set it).

    Raises
    ------
    InputError
        Missing, truncated or non-MRC file; images that are not square.
    """
    path = Path(path)
    header, _, (nz, _, nx), _ = _square_stack_layout(path)
    return nz, nx, _pixel_size_a(header)


def open_stack(path) -> np.memmap:
    """Memory-map a stack read-only; nothing is loaded until it is indexed.

    Parameters
    ----------
    path : str or Path
        An MRC/MRCS stack of square images (or a single 2D image).

    Returns
    -------
    numpy.memmap, shape (n, N, N)
        Indexed ``[i, y, x]``, in the file's own data type (convert slices with
        ``astype(np.float32)``).
    """
    path = Path(path)
    _, dtype, shape, offset = _square_stack_layout(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _temporary_sibling(path: Path) -> Path:
    """A new unique name beside ``path`` (same folder, so ``os.replace`` is atomic).

    The file is not created here: mrcfile creates it (refusing an existing
    one), with the usual permissions.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _write_mrc(path, data: np.ndarray, pixel_size_a: float, *, stack: bool) -> None:
    path = Path(path)
    pixel_size_a = float(pixel_size_a)
    if not pixel_size_a > 0:
        raise ValueError(
            f"pixel_size_a is {pixel_size_a}; expected a positive size in Angstrom"
        )
    tmp = _temporary_sibling(path)
    try:
        with mrcfile.new(tmp) as mrc:
            mrc.set_data(data)
            if stack:
                mrc.set_image_stack()
            mrc.voxel_size = pixel_size_a
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_map(path, volume: np.ndarray, pixel_size_a: float) -> None:
    """Write a 3D map as float32 MRC, atomically.

    Parameters
    ----------
    path : str or Path
        Destination (overwritten if present).
    volume : ndarray, shape (N, N, N)
        Indexed ``[z, y, x]``; written as float32.
    pixel_size_a : float
        Voxel size in Angstrom, stored in the header for x, y and z.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume has shape {volume.shape}; expected (N, N, N)")
    _write_mrc(
        path, np.ascontiguousarray(volume, dtype=np.float32), pixel_size_a, stack=False
    )


def write_stack(path, images: np.ndarray, pixel_size_a: float) -> None:
    """Write an image stack as float32 MRCS, atomically.

    Parameters
    ----------
    path : str or Path
        Destination (overwritten if present), conventionally ``*.mrcs``.
    images : ndarray, shape (n, N, N) or (N, N)
        Indexed ``[i, y, x]``; written as float32.
    pixel_size_a : float
        Pixel size in Angstrom.
    """
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"images have shape {images.shape}; expected (n, N, N)")
    _write_mrc(
        path, np.ascontiguousarray(images, dtype=np.float32), pixel_size_a, stack=True
    )


class StackWriter:
    """Stream a large float32 stack to disk in batches, atomically.

    The stack is created under a temporary name in the destination folder as a
    writable memory map; :meth:`write` fills batches of images; on a clean exit
    of the ``with`` block the header statistics are set and the file is
    renamed to ``path``. On an exception (or if some images were never
    written) the temporary file is removed and nothing appears under ``path``.

    Parameters
    ----------
    path : str or Path
        Final file name, conventionally ``*.mrcs``.
    n : int
        Number of images.
    box : int
        Image size in pixels.
    pixel_size_a : float
        Pixel size in Angstrom.

    Examples
    --------
    >>> with StackWriter("particles.mrcs", 1000, 64, 1.5) as writer:  # doctest: +SKIP
    ...     for start in range(0, 1000, 100):
    ...         writer.write(start, simulate(start, 100))
    """

    def __init__(self, path, n: int, box: int, pixel_size_a: float) -> None:
        self.path = Path(path)
        self.n = int(n)
        self.box = int(box)
        self.pixel_size_a = float(pixel_size_a)
        if self.n < 1 or self.box < 1:
            raise ValueError(f"n = {n}, box = {box}; expected positive integers")
        if not self.pixel_size_a > 0:
            raise ValueError(
                f"pixel_size_a is {pixel_size_a}; expected a positive size in Angstrom"
            )
        self._tmp: Path | None = None
        self._mrc = None
        self._written = np.zeros(self.n, dtype=bool)
        self._min = np.inf
        self._max = -np.inf
        self._sum = 0.0
        self._sum_sq = 0.0

    def __enter__(self) -> StackWriter:
        self._tmp = _temporary_sibling(self.path)
        try:
            self._mrc = mrcfile.new_mmap(
                self._tmp,
                shape=(self.n, self.box, self.box),
                mrc_mode=2,
            )
            self._mrc.set_image_stack()
            self._mrc.voxel_size = self.pixel_size_a
        except BaseException:
            self._abort()
            raise
        return self

    def write(self, start: int, images: np.ndarray) -> None:
        """Store ``images`` (m, N, N) as images ``start .. start + m - 1`` (0-based)."""
        if self._mrc is None:
            raise RuntimeError("StackWriter.write called outside its 'with' block")
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        if images.shape[1:] != (self.box, self.box):
            raise ValueError(
                f"images have shape {images.shape}; "
                f"expected (m, {self.box}, {self.box})"
            )
        stop = start + images.shape[0]
        if start < 0 or stop > self.n:
            raise ValueError(
                f"images {start}..{stop - 1} are outside the stack of {self.n}"
            )
        block = images.astype(np.float32, copy=False)
        self._mrc.data[start:stop] = block
        self._written[start:stop] = True
        if block.size:
            self._min = min(self._min, float(block.min()))
            self._max = max(self._max, float(block.max()))
            b64 = block.astype(np.float64)
            self._sum += float(b64.sum())
            self._sum_sq += float((b64 * b64).sum())

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._abort()
            return False
        missing = np.flatnonzero(~self._written)
        if missing.size:
            self._abort()
            raise RuntimeError(
                f"{self.path}: {missing.size} of {self.n} images were never written "
                f"(first: {missing[0]}); the stack was discarded"
            )
        try:
            count = self.n * self.box * self.box
            mean = self._sum / count
            header = self._mrc.header
            header.dmin, header.dmax, header.dmean = self._min, self._max, mean
            header.rms = np.sqrt(max(self._sum_sq / count - mean * mean, 0.0))
            self._mrc.close()
            self._mrc = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self._abort()
            raise
        return False

    def _abort(self) -> None:
        if self._mrc is not None:
            try:
                self._mrc.close()
            finally:
                self._mrc = None
        if self._tmp is not None:
            _remove_quietly(self._tmp)
