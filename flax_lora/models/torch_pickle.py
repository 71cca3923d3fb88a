"""Read PyTorch `.bin` checkpoints (torch.save's zip format, PyTorch >= 1.6) into numpy, without torch.

Design: such a file is a zip holding `<root>/data.pkl`, a pickle of the state dict, and one `<root>/data/<key>`
entry of raw bytes per storage (`<root>` varies, so it is found from the `data.pkl` entry). Unpickling runs
whatever globals the pickle names, so ours is restricted like `torch.load(weights_only=True)`: `find_class`
hands out inert stand-ins of our own for the few globals a state dict uses (OrderedDict, the tensor rebuild
functions, storage types, dtypes) and refuses every other global before it can be called; torch itself is
never imported. Tensors come out of the pickle as descriptions (storage, dtype, offset, size, stride). Only
once the whole pickle is read and found to be a flat str -> tensor mapping are the storage bytes read, bounds
checked and turned into arrays, each owning its memory (tensors that shared a storage in PyTorch are copies).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickle
import pickletools
import sys
import zipfile
from typing import Any

import numpy as np

from flax_lora.errors import UserError


class TorchCheckpointError(UserError):
    """A PyTorch checkpoint that cannot be read as a flat state dict of tensors."""


class UnsafeCheckpointError(TorchCheckpointError):
    """A checkpoint whose pickle asks for anything beyond tensors (a global that could run code)."""


# torch dtype names we can represent; numpy spells these the same way, except the ones in _ML_DTYPES.
_DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "complex64",
        "complex128",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    }
)
_ML_DTYPES = frozenset(
    {"bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}
)
# Storage classes named in the pickle -> their element dtype. UntypedStorage holds the bytes of the dtypes
# newer than the typed storages (uint16, float8...); _rebuild_tensor_v3 then names the dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


# Stand-ins for torch objects: frozen and slotted, so pickle's BUILD opcode cannot alter them.
@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Dtype:
    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: str
    numel: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Tensor:
    storage: _Storage
    dtype: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor(storage: Any, dtype: str, offset: Any, size: Any, stride: Any, metadata: Any) -> _Tensor:
    """A validated tensor description; the pickle is untrusted, so every field is checked before use."""
    if not isinstance(storage, _Storage):
        raise TypeError(f"tensor storage is a {type(storage).__name__}, expected a storage")
    if not _is_index(offset):
        raise TypeError(f"tensor storage offset is {offset!r}, expected an integer >= 0")
    if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list)) and len(size) == len(stride)):
        raise TypeError(f"tensor size {size!r} and stride {stride!r} are not tuples of one length")
    if not all(_is_index(n) for n in (*size, *stride)):
        raise TypeError(f"tensor size {size!r} or stride {stride!r} holds something other than integers >= 0")
    # Conjugate/negative views store untransformed data plus a flag; a state dict never holds them.
    if metadata and any(metadata.values()):
        raise TypeError(f"tensor metadata {metadata!r} (a conjugate or negative view) is not supported")
    return _Tensor(storage, dtype, offset, tuple(size), tuple(stride))


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _Tensor:
    return _tensor(storage, getattr(storage, "dtype", ""), storage_offset, size, stride, None)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _Tensor:
    return _tensor(storage, getattr(storage, "dtype", ""), storage_offset, size, stride, metadata)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> _Tensor:
    if not isinstance(dtype, _Dtype):
        raise TypeError(f"tensor dtype is {dtype!r}, expected a torch dtype")
    return _tensor(storage, dtype.name, storage_offset, size, stride, metadata)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise TypeError(f"parameter data is a {type(data).__name__}, expected a tensor")
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> _Tensor:
    return _rebuild_parameter(data, requires_grad, backward_hooks)  # Python attributes on a parameter: not weights


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch.storage", "UntypedStorage"): _StorageType("uint8"),
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): _Dtype(name) for name in _DTYPES},
}


def _text(value: Any) -> Any:
    # Checkpoints written by Python 2 hold bytes where Python 3 ones hold str.
    return value.decode("ascii") if isinstance(value, bytes) else value


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that builds tensor descriptions and refuses every global a state dict does not need."""

    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        """Our stand-in for an allowed global; any other global is refused before it can be called."""
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load the global '{module}.{name}' that its data.pkl asks for: "
                "a checkpoint of tensors never needs it, and unpickling it could run code. Only if you trust "
                "the file, convert it to safetensors with PyTorch."
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        """The storage a persistent id ('storage', type, key, location, numel) names; its bytes are read later."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and _text(pid[0]) == "storage"):
            raise TypeError(f"unexpected persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid  # location (cpu, cuda:0) does not change the bytes
        key = _text(key)
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_index(numel):
            raise TypeError(f"unexpected persistent id {pid!r:.200}")
        return _Storage(key, storage_type.dtype, numel)


def _unpickle(data: bytes, path: str) -> Any:
    """The object data.pkl describes, with tensors as `_Tensor` descriptions."""
    try:
        # EXT opcodes fetch globals through copyreg's process-wide cache, which can bypass find_class.
        for opcode, _arg, _pos in pickletools.genops(data):
            if opcode.name.startswith("EXT"):
                raise UnsafeCheckpointError(f"{path}: refusing its data.pkl: it uses the {opcode.name} opcode")
        return _StateDictUnpickler(data, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # a corrupt pickle fails in many ways inside pickle; each means "not a state dict"
        raise TorchCheckpointError(f"{path}: cannot read its data.pkl as a state dict: {e}") from e


def _not_zip_message(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"\x80"):  # a pickle protocol marker: torch.save's legacy format starts with one
        return (
            f"{path}: this checkpoint is in PyTorch's legacy (pre-1.6) format, which we do not read. Re-save it "
            "with PyTorch (`torch.save(torch.load(path, weights_only=True), path)`) or convert it to "
            "safetensors (`safetensors.torch.save_file`)."
        )
    if head.startswith(b"PK"):
        return f"{path}: this is a damaged or truncated zip archive, expected a complete PyTorch checkpoint"
    return f"{path}: not a PyTorch checkpoint; expected a zip archive written by torch.save"


def _root(archive: zipfile.ZipFile, path: str) -> str:
    """The archive's root folder: torch.save names it after the file, others differ."""
    names = archive.namelist()
    roots = [name[: -len("/data.pkl")] for name in names if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(roots) != 1:
        raise TorchCheckpointError(f"{path}: expected one '<root>/data.pkl' entry in its zip, found {len(roots)}")
    return roots[0]


def _byteorder(archive: zipfile.ZipFile, root: str, path: str) -> str:
    try:
        byteorder = archive.read(f"{root}/byteorder").decode("ascii", "replace").strip()
    except KeyError:
        return "little"  # archives from before the record existed came from little-endian machines
    if byteorder not in ("little", "big"):
        raise TorchCheckpointError(f"{path}: its byteorder record says {byteorder!r}, expected 'little' or 'big'")
    return byteorder


def _flat_tensors(state: Any, path: str) -> dict[str, _Tensor]:
    """The state dict's str -> tensor entries; anything else is an error naming what was found."""
    if not isinstance(state, dict):
        found = type(state).__name__
        raise TorchCheckpointError(f"{path}: expected a flat state dict (str -> tensor), found a {found}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, _Tensor):
            found = "a tensor" if isinstance(value, _Tensor) else f"a {type(value).__name__}"
            raise TorchCheckpointError(
                f"{path}: expected a flat state dict (str -> tensor), found key {key!r} holding {found}; "
                "nested checkpoints such as {'state_dict': {...}} are not supported, save the inner dict"
            )
    return dict(state)


def _numpy_dtype(name: str) -> np.dtype:
    if name not in _DTYPES:
        raise TypeError(f"dtype {name!r} has no numpy equivalent")
    if name in _ML_DTYPES:
        import ml_dtypes  # lazily: only bfloat16 and float8 checkpoints need it (it ships with jax)

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def _read_entry(archive: zipfile.ZipFile, entry: str, path: str) -> np.ndarray:
    """An archive entry's bytes as a writable uint8 array (read in place: storages can be gigabytes)."""
    try:
        info = archive.getinfo(entry)
    except KeyError:
        raise TorchCheckpointError(f"{path}: its zip archive lacks '{entry}', which its data.pkl names") from None
    data = np.empty(info.file_size, np.uint8)
    try:
        with archive.open(info) as f:
            read = f.readinto(memoryview(data))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise TorchCheckpointError(f"{path}: cannot read the zip entry '{entry}': {e}") from e
    if read != info.file_size:
        raise TorchCheckpointError(f"{path}: the zip entry '{entry}' holds {read} bytes, expected {info.file_size}")
    return data


def _is_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _array(raw: np.ndarray, tensor: _Tensor, exclusive: bool, swap: bool, where: str) -> np.ndarray:
    """The tensor's values from its storage's bytes; a view of `raw` only when no other tensor uses it."""
    storage = tensor.storage
    expected = storage.numel * _numpy_dtype(storage.dtype).itemsize
    if raw.size != expected:
        raise TorchCheckpointError(f"{where}: its storage holds {raw.size} bytes, expected {expected}")
    dtype = _numpy_dtype(tensor.dtype)
    if raw.size % dtype.itemsize:
        raise TorchCheckpointError(f"{where}: its storage of {raw.size} bytes is not a whole number of {dtype}")
    flat = raw.view(dtype)
    if math.prod(tensor.size) == 0:
        return np.zeros(tensor.size, dtype)
    # as_strided reads whatever memory the strides reach, so the pickle's numbers are bounds checked first.
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if last >= flat.size:
        raise TorchCheckpointError(f"{where}: it reaches element {last} of a storage of {flat.size} {dtype} elements")
    whole = tensor.offset == 0 and math.prod(tensor.size) == flat.size and _is_contiguous(tensor.size, tensor.stride)
    if exclusive and whole:
        array = flat.reshape(tensor.size)
    else:
        strides = tuple(s * dtype.itemsize for s in tensor.stride)
        view = np.lib.stride_tricks.as_strided(flat[tensor.offset :], tensor.size, strides, writeable=False)
        array = np.array(view, order="C")
    if swap:
        array.byteswap(inplace=True)
    return array


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a PyTorch zip checkpoint (a flat state dict), without torch and without running pickled code."""
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise TorchCheckpointError(_not_zip_message(path)) from None
    with archive:
        root = _root(archive, path)
        swap = _byteorder(archive, root, path) != sys.byteorder
        tensors = _flat_tensors(_unpickle(archive.read(f"{root}/data.pkl"), path), path)
        users = collections.Counter(tensor.storage.key for tensor in tensors.values())
        left = collections.Counter(users)
        storages: dict[str, np.ndarray] = {}  # read once per storage, dropped after its last tensor
        arrays = {}
        for name, tensor in tensors.items():
            key = tensor.storage.key
            if key not in storages:
                storages[key] = _read_entry(archive, f"{root}/data/{key}", path)
            where = f"{path}: tensor '{name}' (storage '{key}')"
            try:
                arrays[name] = _array(storages[key], tensor, users[key] == 1, swap, where)
            except TypeError as e:
                raise TorchCheckpointError(f"{where}: {e}") from e
            left[key] -= 1
            if not left[key]:
                del storages[key]
        return arrays
