"""Hugging Face checkpoint directories on disk: config.json and the weights (the tokenizer
files are `kiln.data.hf_tokenizer`'s).

Weights are read from, in this order: `model.safetensors` (or its shards, listed by
`model.safetensors.index.json`), `flax_model.msgpack` (or its shards; Flax parameter names are
mapped to the PyTorch ones), `pytorch_model.bin` (or its shards; PyTorch's zip format, read
without torch through an unpickler that accepts tensors only). Exports write config.json and
one `model.safetensors`. The safetensors format (an 8-byte header length, a JSON header of
dtypes, shapes and byte offsets, then the raw little-endian bytes) is read and written here
with NumPy, so kiln needs no extra package for it.
"""

import collections
import json
import os
import pickle
import zipfile
from typing import Any

import flax.serialization
import ml_dtypes
import numpy as np

from kiln.errors import KilnError

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
FLAX = "flax_model.msgpack"
TORCH = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS, FLAX, TORCH)  # Read in this order; each may be sharded.
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# PyTorch storage classes in a pytorch_model.bin pickle -> their element type.
_TORCH_STORAGES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def read_config(hf_dir: str) -> dict[str, Any]:
    """The directory's config.json, which must name its `model_type`."""
    if not os.path.isdir(hf_dir):
        raise KilnError(
            f"HF checkpoint {hf_dir!r} is not a directory. Give the local directory that"
            " save_pretrained wrote (config.json and model.safetensors); kiln never downloads."
        )
    path = os.path.join(hf_dir, CONFIG)
    if not os.path.exists(path):
        raise KilnError(
            f"HF checkpoint {hf_dir!r} has no {CONFIG}. kiln reads a save_pretrained directory:"
            f" {CONFIG} plus the weights ({' or '.join(WEIGHT_FILES)})."
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as e:
        raise KilnError(f"{path} is not valid JSON ({e}); re-save the checkpoint.") from e
    if not isinstance(config, dict) or "model_type" not in config:
        raise KilnError(
            f"{path} has no model_type; it is not the config.json of a transformers model."
        )
    return config


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of the directory's weights, under its PyTorch parameter name."""
    readers = {SAFETENSORS: read_safetensors, FLAX: _read_flax, TORCH: _read_torch}
    for name in WEIGHT_FILES:
        if os.path.exists(os.path.join(hf_dir, name)):
            return readers[name](os.path.join(hf_dir, name))
        index = os.path.join(hf_dir, f"{name}.index.json")
        if os.path.exists(index):
            return _read_shards(index, readers[name])
    raise KilnError(
        f"HF checkpoint {hf_dir!r} has no weights: none of {list(WEIGHT_FILES)} (or their"
        " .index.json shards) is there. Copy the weight files next to config.json."
    )


def write(hf_dir: str, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """config.json and model.safetensors (float tensors as they are, PyTorch names)."""
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    write_safetensors(os.path.join(hf_dir, SAFETENSORS), tensors, {"format": "pt"})


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of one .safetensors file (read-only views of a memory map)."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        length = int(data[:8].view("<u8")[0])
        header = json.loads(bytes(data[8 : 8 + length]))
    except (ValueError, IndexError) as e:
        raise KilnError(f"{path} is not a safetensors file ({e}); re-save the checkpoint.") from e
    body = data[8 + length :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _DTYPES:
            raise KilnError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']}, which kiln does not read"
                f" (it reads {sorted(_DTYPES)}). Re-save the checkpoint in float32 or bfloat16."
            )
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]].newbyteorder("<")
        tensors[name] = body[begin:end].view(dtype).reshape(entry["shape"])
    return tensors


def write_safetensors(
    path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Writes `tensors` as one .safetensors file (contiguous, in name order)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    arrays, offset = [], 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _DTYPE_NAMES:
            raise KilnError(f"write_safetensors: tensor {name!r} has dtype {array.dtype}.")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": _DTYPE_NAMES[array.dtype.newbyteorder("=")],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        arrays.append(array)
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # The data starts 8-byte aligned.
    # Written beside and renamed: a memory map of the old file (`read_safetensors`) stays valid.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)


def _read_shards(index_path: str, read_one: Any) -> dict[str, np.ndarray]:
    """The tensors of a sharded checkpoint, from the files its index.json lists."""
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map", {})
    folder, tensors = os.path.dirname(index_path), {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        if not os.path.exists(path):
            raise KilnError(
                f"{index_path} lists shard {shard!r}, which is missing from {folder}. Copy every"
                " shard the index names."
            )
        tensors.update(read_one(path))
    return tensors


def _read_flax(path: str) -> dict[str, np.ndarray]:
    """A Flax checkpoint (msgpack) under PyTorch names: path keys joined with '.', `kernel` ->
    `weight` transposed, `scale` and `embedding` -> `weight`."""
    with open(path, "rb") as f:
        tree = flax.serialization.msgpack_restore(f.read())
    tensors = {}

    def visit(node: Any, prefix: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, [*prefix, str(key)])
            return
        array, last = np.asarray(node), prefix[-1]
        if last == "kernel" and array.ndim == 2:
            array, last = array.T, "weight"
        elif last in ("scale", "embedding"):
            last = "weight"
        tensors[".".join([*prefix[:-1], last])] = array

    visit(tree, [])
    return tensors


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a PyTorch zip checkpoint's data.pkl into NumPy arrays; refuses anything but
    tensors, parameters and ordered dicts (so no code in the file ever runs)."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix
        self._storages: dict[str, np.ndarray] = {}  # Tensors may share a storage (tied ones).

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *_: data
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _TORCH_STORAGES:
            return np.dtype(_TORCH_STORAGES[name])
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the pickle")

    def persistent_load(self, pid: Any) -> np.ndarray:
        _, dtype, key, _, _ = pid  # ("storage", dtype, key, location, numel)
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
        return self._storages[key]


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Any, stride: Any, *_: Any) -> Any:
    strides = [s * storage.itemsize for s in stride]
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size), strides=strides)
    return np.array(view)


def _read_torch(path: str) -> dict[str, np.ndarray]:
    """A pytorch_model.bin in PyTorch's zip format (torch >= 1.6), without torch."""
    fix = "Re-save it as safetensors (model.save_pretrained(dir, safe_serialization=True))."
    if not zipfile.is_zipfile(path):
        raise KilnError(
            f"{path} is in PyTorch's legacy (pre-zip) format, which kiln cannot read. {fix}"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise KilnError(
                f"{path} holds no single data.pkl; it is not a PyTorch checkpoint. {fix}"
            )
        prefix = pickles[0][: -len("/data.pkl")]
        with archive.open(pickles[0]) as f:
            try:
                state = _TorchUnpickler(f, archive, prefix).load()
            except (pickle.UnpicklingError, ValueError, KeyError, TypeError) as e:
                raise KilnError(f"{path} could not be read without torch ({e}). {fix}") from e
    if not isinstance(state, dict):
        raise KilnError(f"{path} does not hold a state dict. {fix}")
    return {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}
