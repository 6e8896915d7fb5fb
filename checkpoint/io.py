"""Write and read quantized model directories in msModelSlim's layout.

A quantized model directory (msmodelslim-real-output.md) holds:

* ``quant_model_weights-0000i-of-0000n.safetensors`` shards and
  ``quant_model_weights.safetensors.index.json`` (``{"metadata": {"total_size": bytes},
  "weight_map": {tensor: shard}}``);
* ``quant_model_description.json``: top-level ``version`` ("1.0.0"), ``model_quant_type``,
  ``metadata`` ({}), ``group_size`` (int), ``optional`` ({}), then one entry per tensor;
* ``config.json`` copied unchanged (no ``quantization_config``) and the tokenizer files.

Only NumPy and ml_dtypes are needed: shards are written with ``safetensors.numpy`` and read back
by a small header parser into read-only memory maps (bfloat16 as ``ml_dtypes.bfloat16``), so
reading never modifies the directory.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from .description import DESCRIPTION_FILE, FLOAT, QuantDescription

__all__ = [
    "DESCRIPTION_FILE",
    "WEIGHTS_INDEX_FILE",
    "QuantizedCheckpoint",
    "copy_model_files",
    "float_entries",
    "read_quantized_model",
    "read_safetensors",
    "shard_file_name",
    "write_quantized_model",
]

WEIGHTS_INDEX_FILE = "quant_model_weights.safetensors.index.json"
_DEFAULT_SHARD_BYTES = 5 * 2**30

#: Non-weight files copied from the source model directory (config, generation config,
#: tokenizer and chat-template files).
MODEL_FILE_PATTERNS: tuple[str, ...] = (
    "config.json", "generation_config.json", "tokenizer*", "vocab*", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template*", "*.tiktoken",
    "preprocessor_config.json",
)

_ST_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32), "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def shard_file_name(index: int, count: int) -> str:
    """msModelSlim's shard name, 1-based: ``quant_model_weights-00001-of-00002.safetensors``."""
    return f"quant_model_weights-{index:05d}-of-{count:05d}.safetensors"


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------

def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as read-only NumPy memory maps (no copy).

    Raises ``ValueError`` for a malformed header or an unsupported dtype (naming the tensor).
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed safetensors header: {e}") from None
    out: dict[str, np.ndarray] = {}
    base = 8 + n
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(spec.get("dtype"))
        if dt is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {spec.get('dtype')!r}")
        shape = tuple(int(d) for d in spec["shape"])
        begin, end = (int(v) for v in spec["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dt.itemsize or base + end > size:
            raise ValueError(f"{path}: tensor {name!r}: data_offsets {spec['data_offsets']} do not match "
                             f"shape {list(shape)} of {spec['dtype']}")
        if count == 0:
            out[name] = np.zeros(shape, dtype=dt)
        else:
            out[name] = np.memmap(path, dtype=dt, mode="r", offset=base + begin, shape=shape)
    return out


@dataclass
class QuantizedCheckpoint:
    """A quantized model directory opened read-only (see :func:`read_quantized_model`)."""

    path: str
    description: QuantDescription
    tensors: dict[str, np.ndarray] = field(repr=False)
    config: dict = field(repr=False)

    def module_tensors(self, prefix: str) -> dict[str, np.ndarray]:
        """``{suffix: array}`` of the tensors ``<prefix>.<suffix>`` (suffix without dots)."""
        head = prefix + "."
        return {k[len(head):]: v for k, v in self.tensors.items()
                if k.startswith(head) and "." not in k[len(head):]}

    def layer_algorithm(self, prefix: str, packed_modules=None) -> str | None:
        return self.description.layer_algorithm(prefix, packed_modules)


def _weight_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, WEIGHTS_INDEX_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not os.path.isfile(os.path.join(model_dir, fn))]
        if missing:
            raise FileNotFoundError(f"{index}: shard(s) listed but missing: {missing}")
        return [os.path.join(model_dir, fn) for fn in files]
    files = sorted(fn for fn in os.listdir(model_dir)
                   if fn.startswith("quant_model_weight") and fn.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no quant_model_weight*.safetensors files")
    return [os.path.join(model_dir, fn) for fn in files]


def read_quantized_model(model_dir: str | os.PathLike, *, check_entries: bool = True) -> QuantizedCheckpoint:
    """Open a quantized model directory without modifying it.

    Reads the description, ``config.json`` (``{}`` if absent) and every shard (memory-mapped,
    read-only). With ``check_entries`` every tensor must have a description entry and every
    entry a tensor (``ValueError`` lists the first offenders), as msModelSlim writes them.
    """
    model_dir = os.fspath(model_dir)
    desc = QuantDescription.load(model_dir)
    tensors: dict[str, np.ndarray] = {}
    for path in _weight_files(model_dir):
        for name, arr in read_safetensors(path).items():
            if name in tensors:
                raise ValueError(f"{path}: tensor {name!r} appears in more than one shard")
            tensors[name] = arr
    if check_entries:
        _check_entries(tensors.keys(), desc, model_dir)
    cfg_path = os.path.join(model_dir, "config.json")
    config = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    return QuantizedCheckpoint(model_dir, desc, tensors, config)


def _check_entries(names: Iterable[str], desc: QuantDescription, where: str) -> None:
    names = set(names)
    entries = set(desc)
    no_entry = sorted(names - entries)
    no_tensor = sorted(entries - names)
    if no_entry or no_tensor:
        parts = []
        if no_entry:
            parts.append(f"{len(no_entry)} tensor(s) without a description entry (e.g. {no_entry[:3]})")
        if no_tensor:
            parts.append(f"{len(no_tensor)} description entr(y/ies) without a tensor (e.g. {no_tensor[:3]})")
        raise ValueError(f"{where}: " + "; ".join(parts))


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------

def _as_numpy(name: str, t) -> np.ndarray:
    """NumPy array of a tensor given as NumPy or torch (bf16 -> ml_dtypes.bfloat16)."""
    if isinstance(t, np.ndarray):
        a = t
    elif type(t).__module__.startswith("torch"):
        import torch

        x = t.detach().cpu().contiguous()
        if x.dtype == torch.bfloat16:
            a = x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            a = x.numpy()
    else:
        a = np.asarray(t)
    if a.dtype not in _ST_DTYPES.values():
        raise ValueError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
    return np.ascontiguousarray(a)


def copy_model_files(source_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     patterns: Iterable[str] = MODEL_FILE_PATTERNS) -> list[str]:
    """Copy ``config.json``, tokenizer and similar non-weight files (``patterns``, shell globs,
    top level only); returns the copied file names. ``config.json`` is copied unchanged."""
    source_dir, out_dir = os.fspath(source_dir), os.fspath(out_dir)
    copied = []
    for fn in sorted(os.listdir(source_dir)):
        src = os.path.join(source_dir, fn)
        if not os.path.isfile(src) or fn.endswith((".safetensors", ".bin", ".pt", ".pth")):
            continue
        if any(fnmatch.fnmatch(fn, p) for p in patterns):
            shutil.copyfile(src, os.path.join(out_dir, fn))
            copied.append(fn)
    return copied


def write_quantized_model(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, object],
    entries: Mapping[str, str],
    *,
    model_quant_type: str,
    group_size: int = 0,
    version: str = "1.0.0",
    metadata: Mapping | None = None,
    optional: Mapping | None = None,
    extra_top_level: Mapping[str, object] | None = None,
    source_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = _DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> QuantDescription:
    """Write a quantized model directory in msModelSlim's layout; returns its description.

    Args:
        tensors: checkpoint tensor name -> array (NumPy or torch), written in this order.
        entries: tensor name -> algorithm ID (``"FLOAT"`` for unquantized tensors); must have
            exactly the keys of ``tensors``.
        model_quant_type, group_size, version, metadata, optional: msModelSlim's top-level
            keys (written first, in this order); ``extra_top_level`` adds others
            (e.g. ``kv_cache_type``).
        source_dir: the float model directory; its ``config.json`` and tokenizer files are
            copied (:func:`copy_model_files`).
        max_shard_bytes: a new shard starts before a tensor that would push the current one past
            this size (a single larger tensor gets a shard of its own).
        overwrite: allow writing into a non-empty ``out_dir`` (our own files are replaced).
    """
    out_dir = os.fspath(out_dir)
    from safetensors.numpy import save_file

    if set(tensors) != set(entries):
        _check_entries(tensors.keys(), QuantDescription(dict(entries), {}, "entries"), "write_quantized_model")
    top: dict[str, object] = {
        "version": version,
        "model_quant_type": model_quant_type,
        "metadata": dict(metadata or {}),
        "group_size": int(group_size),
        "optional": dict(optional or {}),
    }
    if extra_top_level:
        top.update(extra_top_level)
    desc = QuantDescription.from_dict({**top, **{k: entries[k] for k in tensors}}, source=DESCRIPTION_FILE)

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: directory is not empty (pass overwrite=True to replace its files)")
    os.makedirs(out_dir, exist_ok=True)
    for fn in os.listdir(out_dir):
        if fn.startswith("quant_model_weight") and fn.endswith((".safetensors", ".json")):
            os.remove(os.path.join(out_dir, fn))

    arrays = {name: _as_numpy(name, t) for name, t in tensors.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for name, a in arrays.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += a.nbytes
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        fn = shard_file_name(i, len(shards))
        save_file({n: arrays[n] for n in names}, os.path.join(out_dir, fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in names})
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in arrays.values()))}, "weight_map": weight_map}
    with open(os.path.join(out_dir, WEIGHTS_INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, DESCRIPTION_FILE), "w", encoding="utf-8") as f:
        json.dump(desc.to_dict(), f, indent=2)
        f.write("\n")
    if source_dir is not None:
        copy_model_files(source_dir, out_dir)
    return desc


def float_entries(names: Iterable[str]) -> dict[str, str]:
    """``{name: "FLOAT"}`` for tensors copied unquantized."""
    return {n: FLOAT for n in names}
