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
from .errors import CheckpointError

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
#: The header size limit of the ``safetensors`` library (its ``HeaderTooLarge``).
_MAX_HEADER_BYTES = 100_000_000

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
    """All tensors of one ``.safetensors`` file as read-only NumPy views of one memory map.

    The header is checked by the rules of the ``safetensors`` library that vLLM loads shards
    with, so that a file accepted here is also accepted there: an 8-byte little-endian header
    length (at most 100 MB and within the file), a UTF-8 JSON object, ``__metadata__`` (if
    present) a ``{str: str}`` object, each tensor ``{"dtype", "shape", "data_offsets"}`` with a
    known dtype, non-negative integer dimensions and two offsets whose span holds exactly the
    tensor's bytes, the tensors tiling the data area with no gap, overlap or trailing bytes.
    Any violation raises :class:`~checkpoint.errors.CheckpointError` naming the file and, where
    one is at fault, the tensor. The file is mapped once (one file descriptor per shard, not one
    per tensor) in read-only mode; nothing is read until a tensor's values are used.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(path, None, "not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(path, None, f"header length {n} exceeds the file size {size}")
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(path, None, f"header length {n} exceeds the safetensors limit of "
                                              f"{_MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(path, None, f"malformed safetensors header (not UTF-8 JSON): {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, None, f"malformed safetensors header: expected a JSON object, found "
                                          f"{type(header).__name__}")
    data_bytes = size - 8 - n
    specs: list[tuple[int, int, str, np.dtype, tuple[int, ...]]] = []
    for name, spec in header.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise CheckpointError(path, "__metadata__", f"expected an object of strings, found {spec!r:.80}")
            continue
        specs.append(_tensor_spec(path, name, spec))
    # the tensors must tile the data area exactly (safetensors' "invalid offset" / "incomplete metadata")
    end_so_far = 0
    for begin, end, name, _, _ in sorted(specs, key=lambda t: (t[0], t[1])):
        if begin != end_so_far:
            what = "overlaps the previous tensor" if begin < end_so_far else "leaves a gap after the previous tensor"
            raise CheckpointError(path, name, f"data_offsets start at {begin}, expected {end_so_far}: the tensor "
                                              f"{what} (safetensors stores tensors back to back)")
        end_so_far = end
    if end_so_far != data_bytes:
        raise CheckpointError(path, None, f"the tensors cover {end_so_far} data bytes but the file holds {data_bytes} "
                                          "after the header (truncated or trailing bytes)")
    out: dict[str, np.ndarray] = {}
    whole = np.memmap(path, dtype=np.uint8, mode="r") if data_bytes else None
    base = 8 + n
    for begin, end, name, dt, shape in specs:
        if begin == end:
            out[name] = np.zeros(shape, dtype=dt)
            out[name].flags.writeable = False
        else:
            out[name] = whole[base + begin: base + end].view(dt).reshape(shape)
    return out


def _tensor_spec(path: str, name: str, spec) -> tuple[int, int, str, np.dtype, tuple[int, ...]]:
    """``(begin, end, name, dtype, shape)`` of one header entry, checked (see :func:`read_safetensors`)."""
    if not isinstance(spec, dict):
        raise CheckpointError(path, name, f"header entry must be an object with dtype, shape and data_offsets, "
                                          f"found {spec!r:.80}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in spec]
    if missing:
        raise CheckpointError(path, name, f"header entry lacks {', '.join(missing)}")
    dtype_name = spec["dtype"]
    dt = _ST_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dt is None:
        raise CheckpointError(path, name, f"unsupported dtype {dtype_name!r:.40}; expected one of "
                                          f"{', '.join(_ST_DTYPES)}")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(path, name, f"shape must be a list of non-negative integers, found {shape!r:.80}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(v) for v in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(path, name, f"data_offsets must be [begin, end] with 0 <= begin <= end, "
                                          f"found {offsets!r:.80}")
    count = 1
    for d in shape:
        count *= d
    begin, end = offsets
    if end - begin != count * dt.itemsize:
        raise CheckpointError(path, name, f"data_offsets {offsets} do not match shape {shape} of {dtype_name} "
                                          f"({count * dt.itemsize} bytes)")
    return begin, end, name, dt, tuple(shape)


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64


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


def _load_json(model_dir: str, fn: str, what: str):
    try:
        with open(os.path.join(model_dir, fn), encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(model_dir, fn, f"invalid JSON ({what}): {e.msg} at line {e.lineno} column {e.colno}"
                              ) from None
    except UnicodeDecodeError as e:
        raise CheckpointError(model_dir, fn, f"not UTF-8 text ({what}): {e}") from None
    except OSError as e:
        raise CheckpointError(model_dir, fn, f"unreadable ({what}): {e.strerror or e}") from None


def _weight_files(model_dir: str) -> list[str]:
    if os.path.isfile(os.path.join(model_dir, WEIGHTS_INDEX_FILE)):
        index = _load_json(model_dir, WEIGHTS_INDEX_FILE, "the weights index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(model_dir, WEIGHTS_INDEX_FILE, "expected an object with 'weight_map': "
                                                                 "{tensor name: shard file}")
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not os.path.isfile(os.path.join(model_dir, fn))]
        if missing:
            raise CheckpointError(model_dir, WEIGHTS_INDEX_FILE, f"shard(s) listed but missing: {missing}")
        return [os.path.join(model_dir, fn) for fn in files]
    files = sorted(fn for fn in os.listdir(model_dir)
                   if fn.startswith("quant_model_weight") and fn.endswith(".safetensors"))
    if not files:
        raise CheckpointError(model_dir, None, "no quant_model_weight*.safetensors files")
    return [os.path.join(model_dir, fn) for fn in files]


def read_quantized_model(model_dir: str | os.PathLike, *, check_entries: bool = True,
                         validate: bool = False) -> QuantizedCheckpoint:
    """Open a quantized model directory without modifying it.

    Reads the description, ``config.json`` (``{}`` if absent) and every shard (memory-mapped,
    read-only). With ``check_entries`` every tensor must have a description entry and every
    entry a tensor, as msModelSlim writes them. With ``validate`` the directory first goes
    through :func:`checkpoint.validate.validate_checkpoint` (every layer's tensors against its
    algorithm, values included), so that what is returned can be run. Every problem with the
    directory raises :class:`~checkpoint.errors.CheckpointError` (a ``ValueError``) naming it.
    """
    model_dir = os.fspath(model_dir)
    if validate:
        from .validate import validate_checkpoint

        validate_checkpoint(model_dir, raise_errors=True)
    if not os.path.isfile(os.path.join(model_dir, DESCRIPTION_FILE)):
        raise CheckpointError(model_dir, DESCRIPTION_FILE, "missing (msModelSlim writes it next to the weights)")
    data = _load_json(model_dir, DESCRIPTION_FILE, "the quantization description")
    try:
        desc = QuantDescription.from_dict(data, source=os.path.join(model_dir, DESCRIPTION_FILE))
    except ValueError as e:
        raise CheckpointError(model_dir, DESCRIPTION_FILE, str(e).split(": ", 1)[-1]) from None
    tensors: dict[str, np.ndarray] = {}
    for path in _weight_files(model_dir):
        for name, arr in read_safetensors(path).items():
            if name in tensors:
                raise CheckpointError(path, name, "tensor appears in more than one shard")
            tensors[name] = arr
    if check_entries:
        _check_entries(tensors.keys(), desc, model_dir)
    config = {}
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        config = _load_json(model_dir, "config.json", "the model config")
        if not isinstance(config, dict):
            raise CheckpointError(model_dir, "config.json", f"expected a JSON object, found {type(config).__name__}")
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
        raise CheckpointError(where, None, "; ".join(parts))


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
