"""File plumbing shared by the weight formats: reading safetensors and npz files with errors
that name the file and the fix, and writing a folder atomically.

Every reader here turns a missing, truncated or corrupt file into one of two exceptions whose
message names the file and says what to do, instead of a stack trace from deep inside
safetensors or numpy.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

REFETCH = "re-download or re-convert the transcoder"


class TranscoderFormatError(ValueError):
    """A transcoder's files are unreadable, inconsistent, or in no format we know."""


def missing(path: Path, what: str = "file") -> FileNotFoundError:
    if what == "path":
        return FileNotFoundError(f"transcoder path {path} does not exist: check the path")
    return FileNotFoundError(f"transcoder {what} {path} does not exist: {REFETCH}")


def _corrupt(path: Path, err: Exception) -> TranscoderFormatError:
    return TranscoderFormatError(f"{path} is truncated or corrupt ({err}): {REFETCH}")


class SafetensorsFile:
    """Named tensors of one .safetensors file, read on demand (the file is memory-mapped, so
    reading one tensor does not read the others). Opening it checks the header, which catches
    truncated files at once: safetensors requires the header to cover the whole file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise missing(self.path)
        with self._open() as f:
            self.keys = set(f.keys())
            self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in self.keys}

    @contextmanager
    def _open(self) -> Iterator:
        if not self.path.is_file():
            raise missing(self.path)
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                yield f
        except SafetensorError as err:
            raise _corrupt(self.path, err) from None
        except OSError as err:
            raise _corrupt(self.path, err) from None

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def require(self, key: str) -> None:
        if key not in self.keys:
            raise TranscoderFormatError(
                f"{self.path} has no tensor {key!r} (it has {sorted(self.keys)}): "
                f"it is not the format it was read as; {REFETCH}"
            )

    def get(self, key: str) -> torch.Tensor:
        self.require(key)
        with self._open() as f:
            try:
                return f.get_tensor(key)
            except SafetensorError as err:
                raise _corrupt(self.path, err) from None

    def rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (1-D, along the first axis) of tensor ``key``, reading only those."""
        self.require(key)
        idx = index.to(torch.long).cpu()
        if len(idx) == 0:
            return torch.empty((0, *self.shapes[key][1:]))
        with self._open() as f:
            sl = f.get_slice(key)
            try:
                return sl[idx.tolist()]
            except (TypeError, SafetensorError):
                # Older safetensors slice only by ranges: read the covering range, then pick.
                lo, hi = int(idx.min()), int(idx.max()) + 1
                return sl[lo:hi][idx - lo]


class LazySafetensorsFile:
    """A .safetensors file that is not touched until first used; then its header is kept, so
    repeated row reads do not parse it again."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: SafetensorsFile | None = None

    def file(self) -> SafetensorsFile:
        if self._file is None:
            self._file = SafetensorsFile(self.path)
        return self._file

    def get(self, key: str) -> torch.Tensor:
        return self.file().get(key)

    def rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        return self.file().rows(key, index)


class NpzFile:
    """Arrays of one .npz file (a zip of .npy files, read one array at a time)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise missing(self.path)
        with self._open() as z:
            self.keys = set(z.files)

    @contextmanager
    def _open(self) -> Iterator:
        try:
            with np.load(self.path, allow_pickle=False) as z:
                yield z
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise _corrupt(self.path, err) from None

    def get(self, key: str) -> torch.Tensor:
        if key not in self.keys:
            raise TranscoderFormatError(
                f"{self.path} has no array {key!r} (it has {sorted(self.keys)}): {REFETCH}"
            )
        with self._open() as z:
            try:
                arr = z[key]
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
                raise _corrupt(self.path, err) from None
        return torch.from_numpy(np.ascontiguousarray(arr))

    def rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (1-D, first axis) of array ``key``. An array stored uncompressed (as
        ``np.savez`` writes them, GemmaScope's params.npz included) is memory-mapped in place,
        so only those rows are read; a compressed one is read whole."""
        if key not in self.keys:
            self.get(key)  # the clear error
        idx = index.to(torch.long).cpu().numpy()
        try:
            arr = self._mapped(key)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as err:
            raise _corrupt(self.path, err) from None
        if arr is None:
            return self.get(key)[torch.from_numpy(idx)]
        return torch.from_numpy(np.ascontiguousarray(arr[idx]))

    def _mapped(self, key: str) -> np.ndarray | None:
        """The array as a read-only memory map of the .npz file (None when compressed)."""
        with zipfile.ZipFile(self.path) as z:
            info = z.getinfo(f"{key}.npy")
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)  # fmt: skip
                shape, fortran, dtype = read_header(f)
                header_len = f.tell()
        with open(self.path, "rb") as raw:
            raw.seek(info.header_offset)
            local = struct.unpack("<4s5H3L2H", raw.read(30))  # the zip's local file header
        start = info.header_offset + 30 + local[9] + local[10] + header_len
        if dtype.hasobject:
            return None
        return np.memmap(self.path, dtype=dtype, mode="r", offset=start, shape=shape,
                         order="F" if fortran else "C")  # fmt: skip


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, dtype=None) -> None:
    """Write contiguous CPU copies (safetensors refuses views and shared storage)."""
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        v = v.contiguous()
        whole = v.storage_offset() == 0 and v.untyped_storage().nbytes() == v.nbytes
        out[k] = v if whole else v.clone()
    save_file(out, str(path))


def atomic_folder(dst: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool):
    """Run ``write(tmp)`` on a fresh temporary folder beside ``dst``, then move it into place.

    A failed write leaves nothing at ``dst`` (or leaves the old ``dst`` untouched); an existing
    ``dst`` is replaced only with ``overwrite``.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(
            f"{dst} already exists: choose another destination or allow overwriting (--force)"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.writing-", dir=dst.parent))
    try:
        # mkdtemp makes the folder private (0700); give it the permissions mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        write(tmp)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            old.rmdir()
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
