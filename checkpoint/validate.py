"""The one validation of a quantized model directory (msModelSlim layout), read-only.

:func:`validate_checkpoint` opens a directory and checks, in this order: the description file
(present, valid JSON, a valid description), ``config.json`` (valid JSON if present), the weights
index against the shards it names (missing shards, tensors in the wrong shard or in none), the
description entries against the tensors in the shards (both directions), and then every module
(``<prefix>.weight`` entry):

* the algorithm ID is one ascend-quant implements (unknown IDs and IDs of vLLM Ascend schemes we do
  not implement are rejected with the supported list; MoE experts need a MoE algorithm);
* its tensors against :data:`reference.linear.EXPECTED_TENSORS` via
  :func:`reference.linear.validate_tensors` (missing / extra / misnamed tensors, dtype, shape,
  non-finite / zero / negative scales, int4 range of unpacked storage, zero offsets, clip ratio);
* what that table cannot express: integral ``input_offset`` in [-128, 127], the int4 range of the
  unpacked W4A8 layout, the group size against K and the scale's group count, W4A16
  ``weight_shape``, FlatQuant factor shapes (:func:`reference.flatquant.transform_shapes`), the
  float bias (float dtype, shape ``(N,)``), FLOAT modules stored as floats;
* fused shards (q/k/v, gate/up, every expert of one MoE layer) share one algorithm ID, and the
  per-tensor parameters vLLM loads once per fused layer (W8A8 ``input_scale``/``input_offset``,
  FlatQuant ``left_trans``/``right_trans``/``clip_ratio``) are identical across the shards.

:func:`check_tensors` runs the same checks on a description dict and any mapping of tensor name ->
array (e.g. a lazy reader), for the vLLM integration at load time. Nothing is ever written: shards
are opened by :func:`checkpoint.io.read_safetensors` as read-only memory maps, so only the tensors a
check touches are read. All problems are collected; :meth:`CheckpointReport.raise_if_errors` raises
them as one :class:`~checkpoint.errors.CheckpointError`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..reference import algorithms as A
from ..reference.flatquant import transform_shapes
from ..reference.linear import EXPECTED_TENSORS, validate_tensors
from ..reference.rounding import INT4_MAX, INT4_MIN, INT8_MAX, INT8_MIN
from .description import (
    DESCRIPTION_FILE,
    FLOAT,
    KNOWN_ALGORITHM_IDS,
    QuantDescription,
    packed_modules_for,
)
from .errors import CheckpointError
from .io import WEIGHTS_INDEX_FILE, read_safetensors

__all__ = [
    "CheckpointError",
    "CheckpointReport",
    "ModuleInfo",
    "check_tensors",
    "validate_checkpoint",
]

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
#: Fused names checked for every model type, on top of the model type's own mapping.
_DEFAULT_FUSED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "experts": ("experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj"),
}
#: Per-tensor parameters vLLM holds once per fused linear (PerTensorScaleParameter: last shard
#: wins, facts §3.7; FlatQuant transforms: facts §9.13), so the shards must agree bit for bit.
_SHARED_PER_FUSED = {
    A.W8A8: ("input_scale", "input_offset"),
    A.W8A8_MIX: ("input_scale", "input_offset"),
    A.W4A4_FLATQUANT_DYNAMIC: ("left_trans", "right_trans", "clip_ratio"),
}
#: Float tensors a quantized module may carry besides its algorithm's table.
_FLOAT_EXTRAS = ("bias", "e_score_correction_bias")
_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)$")
_WEIGHT_SUFFIXES = ("weight", "weight_packed")


@dataclass
class ModuleInfo:
    """One module (a ``<prefix>.weight`` entry) of a checkpoint.

    ``bytes`` counts its stored tensors (bias included); ``bf16_bytes`` what the same module takes
    in bfloat16 (``N * K * 2`` for a linear weight, plus its bias), the baseline of the compression
    ratio. ``n``/``k`` are the output/input features when known.
    """

    prefix: str
    algorithm: str
    bytes: int = 0
    bf16_bytes: int = 0
    n: int | None = None
    k: int | None = None
    expert_of: str | None = None
    tensors: tuple[str, ...] = ()

    @property
    def ratio(self) -> float:
        """bf16 bytes / stored bytes (> 1: smaller than bf16)."""
        return self.bf16_bytes / self.bytes if self.bytes else float("nan")


@dataclass
class CheckpointReport:
    """The result of a validation: per-module info, errors and warnings."""

    where: str
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    other_bytes: int = 0
    other_bf16_bytes: int = 0
    errors: list[CheckpointError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    description: QuantDescription | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_errors(self) -> CheckpointReport:
        """Raise every collected problem as one :class:`CheckpointError`; else return self."""
        if self.errors:
            raise CheckpointError.combine(self.where, self.errors)
        return self

    @property
    def total_bytes(self) -> int:
        return sum(m.bytes for m in self.modules.values()) + self.other_bytes

    @property
    def total_bf16_bytes(self) -> int:
        return sum(m.bf16_bytes for m in self.modules.values()) + self.other_bf16_bytes

    def by_algorithm(self) -> dict[str, dict[str, int]]:
        """``{algorithm: {"modules", "bytes", "bf16_bytes"}}``; tensors outside modules count
        under FLOAT."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"modules": 0, "bytes": 0, "bf16_bytes": 0})
        for m in self.modules.values():
            row = out[m.algorithm]
            row["modules"] += 1
            row["bytes"] += m.bytes
            row["bf16_bytes"] += m.bf16_bytes
        if self.other_bytes:
            out[FLOAT]["bytes"] += self.other_bytes
            out[FLOAT]["bf16_bytes"] += self.other_bf16_bytes
        return dict(out)


class _Collector:
    def __init__(self, report: CheckpointReport):
        self.report = report
        self.seen: set[tuple[str | None, str]] = set()
        self.keys_with_errors: set[str] = set()

    def error(self, key: str | None, problem: str, where: str | None = None) -> None:
        if (key, problem) in self.seen:
            return
        self.seen.add((key, problem))
        if key:
            self.keys_with_errors.add(key)
        self.report.errors.append(CheckpointError(where or self.report.where, key, problem))

    def warn(self, key: str | None, problem: str) -> None:
        self.report.warnings.append(f"{key}: {problem}" if key else problem)


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------

def _load_json(path: str, c: _Collector, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        c.error(os.path.basename(path), f"invalid JSON ({what}): {e.msg} at line {e.lineno} column {e.colno}")
    except UnicodeDecodeError as e:
        c.error(os.path.basename(path), f"not UTF-8 text ({what}): {e}")
    return None


def _read_shard(path: str, c: _Collector) -> dict[str, np.ndarray] | None:
    try:
        return read_safetensors(path)
    except (ValueError, KeyError, TypeError, OSError) as e:
        msg = str(e)
        if msg.startswith(path):
            msg = msg[len(path):].lstrip(": ")
        c.error(os.path.basename(path), f"unreadable safetensors file: {msg}")
        return None


def _read_weights(model_dir: str, c: _Collector) -> tuple[dict[str, np.ndarray], set[str]]:
    """Tensors of every shard (read-only memory maps), checked against the index if present, and
    the names the index maps to a missing or unreadable shard (reported once, per shard)."""
    tensors: dict[str, np.ndarray] = {}
    lost: set[str] = set()
    origin: dict[str, str] = {}
    on_disk = sorted(fn for fn in os.listdir(model_dir)
                     if fn.startswith("quant_model_weight") and fn.endswith(".safetensors"))
    index_path = os.path.join(model_dir, WEIGHTS_INDEX_FILE)
    weight_map: dict[str, str] | None = None
    if os.path.isfile(index_path):
        index = _load_json(index_path, c, "the weights index")
        if index is not None:
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                c.error(WEIGHTS_INDEX_FILE, "expected an object with 'weight_map': {tensor name: shard file}, "
                                            f"found {type(wm).__name__ if wm is not None else 'no weight_map'}")
            else:
                weight_map = wm
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        for fn in files:
            if not os.path.isfile(os.path.join(model_dir, fn)):
                names = sorted(k for k, v in weight_map.items() if v == fn)
                lost.update(names)
                c.error(WEIGHTS_INDEX_FILE, f"points at shard {fn!r}, which is missing from the directory "
                                            f"({len(names)} tensor(s), e.g. {names[0]!r})")
        for fn in on_disk:
            if fn not in files:
                c.warn(fn, f"shard not listed in {WEIGHTS_INDEX_FILE}; vLLM ignores it")
    else:
        files = on_disk
        if not files and not c.report.errors:
            c.error(None, "no quant_model_weight*.safetensors files and no "
                          f"{WEIGHTS_INDEX_FILE}")
    for fn in files:
        path = os.path.join(model_dir, fn)
        if not os.path.isfile(path):
            continue
        shard = _read_shard(path, c)
        if shard is None:
            if weight_map is not None:
                lost.update(k for k, v in weight_map.items() if v == fn)
            continue
        for name, arr in shard.items():
            if name in tensors:
                c.error(name, f"tensor stored twice, in {origin[name]!r} and {fn!r}")
                continue
            tensors[name] = arr
            origin[name] = fn
            if weight_map is not None and weight_map.get(name) != fn:
                where = weight_map.get(name)
                lost.discard(name)
                c.error(name, f"stored in shard {fn!r} but {WEIGHTS_INDEX_FILE} "
                              + (f"maps it to {where!r}" if where else "does not list it"))
    if weight_map is not None:
        for name, fn in weight_map.items():
            if name not in tensors and name not in lost:
                c.error(name, f"{WEIGHTS_INDEX_FILE} maps it to shard {fn!r}, which has no such tensor")
    return tensors, lost


def validate_checkpoint(model_dir: str | os.PathLike, *, check_values: bool = True,
                        raise_errors: bool = False) -> CheckpointReport:
    """Validate the quantized model directory ``model_dir`` without writing to it.

    Returns a :class:`CheckpointReport` (``report.errors`` empty when valid). With
    ``raise_errors`` every problem is raised at once as a :class:`CheckpointError`.
    ``check_values=False`` skips the checks that read tensor data (scale values, int4 ranges,
    shared fused parameters): names, dtypes and shapes come from the shard headers alone.
    """
    model_dir = os.fspath(model_dir)
    report = CheckpointReport(model_dir)
    c = _Collector(report)
    if not os.path.isdir(model_dir):
        c.error(None, "not a directory")
        return report.raise_if_errors() if raise_errors else report
    desc_path = os.path.join(model_dir, DESCRIPTION_FILE)
    desc: QuantDescription | None = None
    if not os.path.isfile(desc_path):
        c.error(DESCRIPTION_FILE, "missing: a quantized model directory holds quant_model_description.json "
                                  "(msModelSlim writes it next to the weights)")
    else:
        data = _load_json(desc_path, c, "the quantization description")
        if data is not None:
            try:
                desc = QuantDescription.from_dict(data, source=DESCRIPTION_FILE)
            except ValueError as e:
                msg = str(e)
                c.error(DESCRIPTION_FILE, msg[len(DESCRIPTION_FILE) + 2:] if msg.startswith(DESCRIPTION_FILE) else msg)
    config: dict = {}
    cfg_path = os.path.join(model_dir, "config.json")
    if os.path.isfile(cfg_path):
        loaded = _load_json(cfg_path, c, "the model config")
        if isinstance(loaded, dict):
            config = loaded
        elif loaded is not None:
            c.error("config.json", f"expected a JSON object, found {type(loaded).__name__}")
    else:
        c.warn("config.json", "missing (msModelSlim copies the float model's config.json; vLLM needs it)")
    tensors, lost = _read_weights(model_dir, c)
    if desc is not None:
        _check(desc, tensors, config, c, check_values, lost)
    return report.raise_if_errors() if raise_errors else report


def check_tensors(description: Mapping | QuantDescription, tensors: Mapping[str, object], *,
                  where: str = "<checkpoint>", config: Mapping | None = None, check_values: bool = True,
                  raise_errors: bool = True) -> CheckpointReport:
    """The checks of :func:`validate_checkpoint` after the files are read: ``description`` (the
    JSON dict or a :class:`QuantDescription`) against ``tensors`` (name -> array; NumPy arrays,
    memory maps or torch tensors; only the tensors a check needs are converted). ``config`` is
    the HF config dict (its ``model_type`` selects the fused-module mapping)."""
    report = CheckpointReport(str(where))
    c = _Collector(report)
    if isinstance(description, QuantDescription):
        desc = description
    else:
        try:
            desc = QuantDescription.from_dict(description, source=DESCRIPTION_FILE)
        except ValueError as e:
            c.error(DESCRIPTION_FILE, str(e))
            return report.raise_if_errors() if raise_errors else report
    _check(desc, _LazyArrays(tensors), dict(config or {}), c, check_values)
    return report.raise_if_errors() if raise_errors else report


class _LazyArrays(Mapping):
    """Name -> NumPy array view of a mapping of arrays or torch tensors, converted on access."""

    def __init__(self, tensors: Mapping[str, object]):
        self._t = tensors

    def __getitem__(self, name: str) -> np.ndarray:
        t = self._t[name]
        if isinstance(t, np.ndarray):
            return t
        if type(t).__module__.startswith("torch"):
            import ml_dtypes
            import torch

            x = t.detach().cpu().contiguous()
            if x.dtype == torch.bfloat16:
                return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return x.numpy()
        return np.asarray(t)

    def __iter__(self):
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def __contains__(self, name: object) -> bool:
        return name in self._t


# ---------------------------------------------------------------------------------------
# the checks
# ---------------------------------------------------------------------------------------

def _split(name: str) -> tuple[str, str]:
    prefix, _, suffix = name.rpartition(".")
    return prefix, suffix


def _supported_text() -> str:
    return ", ".join((FLOAT, *A.LINEAR_ALGORITHMS))


def _module_prefixes(desc: QuantDescription, names: Iterable[str]) -> list[str]:
    out: dict[str, None] = {}
    for name in list(desc) + list(names):
        prefix, suffix = _split(name)
        if prefix and suffix in _WEIGHT_SUFFIXES:
            out.setdefault(prefix)
    return list(out)


def _check(desc: QuantDescription, tensors: Mapping[str, np.ndarray], config: Mapping, c: _Collector,
           check_values: bool, lost: set[str] = frozenset()) -> None:
    """All checks after reading; ``lost`` tensors (in a missing or unreadable shard, reported
    already) are not reported again, and modules holding one are only counted, not checked."""
    report = c.report
    report.description = desc
    names = set(tensors)
    entries = set(desc)
    modules = _module_prefixes(desc, names)
    module_set = set(modules)

    # description <-> tensors, both directions
    for name in sorted(names - entries):
        if not name.endswith(".weight") or name[: -len(".weight")] + ".weight_packed" not in entries:
            c.error(name, f"tensor in the shards has no entry in {DESCRIPTION_FILE}")
    for name in sorted(entries - names - lost):
        c.error(name, f"listed in {DESCRIPTION_FILE} as {desc[name]!r} but no shard holds this tensor")

    # tensors by module
    members: dict[str, dict[str, str]] = defaultdict(dict)
    for name in names | entries:
        prefix, suffix = _split(name)
        if prefix in module_set:
            members[prefix][suffix] = name
            continue
        algo = desc.get(name, FLOAT)
        if algo != FLOAT and name in names:
            c.error(name, f"a {algo} tensor outside any module: no {prefix}.weight entry or tensor "
                          "(misnamed tensor or module?)")
        elif name in names:
            report.other_bytes += int(tensors[name].nbytes)
            report.other_bf16_bytes += _bf16_bytes(tensors[name])

    text_config = config.get("text_config") or config
    model_dtype = str(text_config.get("torch_dtype") or text_config.get("dtype") or config.get("dtype") or "")
    for prefix in modules:
        if any(n in lost for n in members[prefix].values()):
            c.report.modules[prefix] = ModuleInfo(prefix, desc.get(prefix + ".weight", "?"))
            continue
        _check_module(prefix, members[prefix], desc, tensors, c, check_values, model_dtype)

    _check_fused(desc, tensors, config, c, check_values)


def _bf16_bytes(a) -> int:
    return int(np.prod(a.shape, dtype=np.int64)) * 2


def _weight_algorithm(prefix: str, desc: QuantDescription, c: _Collector) -> str | None:
    key = prefix + ".weight"
    if key not in desc:
        return None
    algo = desc[key]
    if algo == FLOAT or algo in A.LINEAR_ALGORITHMS:
        return algo
    if algo in KNOWN_ALGORITHM_IDS:
        c.error(key, f"algorithm ID {algo!r} (a vLLM Ascend scheme) is not implemented by ascend-quant; "
                     f"supported: {_supported_text()}")
    else:
        close = difflib.get_close_matches(algo, (FLOAT, *A.LINEAR_ALGORITHMS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        c.error(key, f"unknown algorithm ID {algo!r}{hint}; supported: {_supported_text()}")
    return None


def _check_module(prefix: str, suffixes: dict[str, str], desc: QuantDescription,
                  tensors: Mapping[str, np.ndarray], c: _Collector, check_values: bool, model_dtype: str) -> None:
    report = c.report
    present = {s: n for s, n in suffixes.items() if n in tensors}
    m_exp = _EXPERT.match(prefix)
    expert_of = m_exp["experts"] if m_exp else None
    wkey = prefix + ".weight"
    algo = _weight_algorithm(prefix, desc, c)
    info = ModuleInfo(prefix, algo or desc.get(wkey, "?"), expert_of=expert_of,
                      tensors=tuple(sorted(present)))
    info.bytes = sum(int(tensors[n].nbytes) for n in present.values())
    report.modules[prefix] = info
    if algo is None:
        # unknown ID, or a weight tensor without an entry (reported already): count sizes only
        w = tensors.get(wkey)
        if w is not None:
            info.bf16_bytes = _bf16_bytes(w)
        return

    # informational entries of the module's other tensors (only .weight selects the algorithm)
    for suffix, name in suffixes.items():
        value = desc.get(name)
        if value is None or suffix in _WEIGHT_SUFFIXES:
            continue
        if suffix in _FLOAT_EXTRAS and value != FLOAT:
            c.warn(name, f"float {suffix} is normally described FLOAT, found {value!r}")
        elif suffix not in _FLOAT_EXTRAS and value != algo:
            c.warn(name, f"entry {value!r} differs from the module's {wkey} entry {algo!r} "
                         "(informational only: the .weight entry selects the algorithm)")

    if algo == FLOAT:
        _check_float_module(prefix, present, tensors, c, info)
        return

    # a layer that cannot run with this algorithm: say so once, skip its tensor checks
    if expert_of is not None and algo not in A.MOE_ALGORITHMS:
        c.error(wkey, f"MoE expert projection described {algo!r}, which has no MoE implementation; "
                      f"MoE experts support: {', '.join(A.MOE_ALGORITHMS)}")
        return
    if prefix.split(".")[-1] in ("embed_tokens", "wte", "word_embeddings") or prefix.endswith(".embed"):
        c.error(wkey, f"embedding described {algo!r}: only linear layers (lm_head included) can be quantized")
        return

    table = EXPECTED_TENSORS[algo]
    layer: dict[str, np.ndarray] = {}
    extras: dict[str, str] = {}
    for suffix, name in present.items():
        if suffix in table:
            layer[suffix] = tensors[name]
        elif suffix in _FLOAT_EXTRAS:
            extras[suffix] = name
        else:
            expected = ", ".join(table)
            close = difflib.get_close_matches(suffix, list(table), n=1)
            hint = f" (misnamed {close[0]!r}?)" if close else ""
            c.error(name, f"not a tensor of {algo}{hint}; {algo} modules hold {expected}")
    for suffix, spec in table.items():
        name = f"{prefix}.{suffix}"
        if spec.required and suffix not in layer and name not in c.keys_with_errors:
            c.error(name, f"missing: {algo} needs {spec.describe()} ({spec.use})")
    if any(s.required and s_ not in layer for s_, s in table.items()):
        return

    try:
        if check_values:
            dims = validate_tensors(algo, layer)
        else:
            dims = validate_tensors(algo, {k: _header_only(algo, k, v) for k, v in layer.items()})
    except ValueError as e:
        key, _, problem = str(e).partition(": ")
        c.error(f"{prefix}.{key}" if key in table else prefix, problem if key in table else str(e))
        return
    n = dims["N"]
    k = dims.get("K")
    if algo == A.W4A16:
        k = _check_w4a16_shape(prefix, layer, dims, c, check_values)
    info.n, info.k = n, k
    if k is not None:
        info.bf16_bytes = n * k * 2

    _check_group_size(prefix, algo, layer, dims, k, desc.group_size, c)
    if check_values:
        _check_extra_values(prefix, algo, layer, dims, c)
    if algo == A.W4A4_FLATQUANT_DYNAMIC and k is not None:
        try:
            transform_shapes(layer["left_trans"], layer.get("right_trans"), k)
        except ValueError as e:
            key = "right_trans" if "right_trans" in str(e) and "right_trans" in layer else "left_trans"
            c.error(f"{prefix}.{key}", str(e))
    if algo == A.W4A8_DYNAMIC and layer["weight"].shape[0] * 2 == n and desc.version != "1.0.0":
        c.warn(wkey, f"packed W4A8 layout [N/2, K] but description version {desc.version!r}: vLLM Ascend "
                     "reads this layout only with version '1.0.0'")
    if algo in (A.W8A8, A.W8A8_MIX) and layer["deq_scale"].dtype == np.int64 and "bfloat16" in model_dtype:
        c.warn(f"{prefix}.deq_scale", "int64 deq_scale in a bfloat16 model: vLLM Ascend declares it float32 "
                                      "for bf16 models (msModelSlim writes float32 for bf16 sources)")
    for suffix, name in extras.items():
        a = tensors[name]
        info.bf16_bytes += _bf16_bytes(a)
        if a.dtype.name not in _FLOAT_DTYPES:
            c.error(name, f"expected a float {suffix} ({' or '.join(_FLOAT_DTYPES)}), found dtype {a.dtype}")
        elif suffix == "bias" and tuple(a.shape) != (n,):
            c.error(name, f"expected shape (N,) = ({n},), found {tuple(a.shape)}")
        elif check_values and not np.isfinite(np.asarray(a, dtype=np.float64)).all():
            c.error(name, "values must be finite, found NaN or inf")


def _header_only(algo: str, suffix: str, a) -> np.ndarray:
    """A stand-in with ``a``'s dtype and shape (no data read) whose values pass the table's value
    rule, for ``check_values=False``: scales 1.0 (int64: the float32 bits of 1.0), others 0."""
    rule = EXPECTED_TENSORS[algo][suffix].values
    fill = 0
    if rule in ("scale", "clip"):
        fill = 0x3F800000 if a.dtype == np.int64 else 1
    return np.broadcast_to(np.array(fill, dtype=a.dtype), tuple(a.shape))


def _check_float_module(prefix: str, present: dict[str, str], tensors, c: _Collector, info: ModuleInfo) -> None:
    for suffix, name in present.items():
        a = tensors[name]
        info.bf16_bytes += _bf16_bytes(a)
        if suffix in _WEIGHT_SUFFIXES and a.dtype.name not in _FLOAT_DTYPES:
            c.error(name, f"described FLOAT but stored as {a.dtype} (expected {' or '.join(_FLOAT_DTYPES)}): "
                          "a quantized weight described FLOAT?")
        elif suffix not in _WEIGHT_SUFFIXES and suffix not in _FLOAT_EXTRAS and a.dtype.name not in _FLOAT_DTYPES:
            c.error(name, f"quantization tensor ({a.dtype}) on a module whose {prefix}.weight is FLOAT")
    w = tensors.get(prefix + ".weight")
    if w is not None and w.ndim == 2:
        info.n, info.k = int(w.shape[0]), int(w.shape[1])


def _check_w4a16_shape(prefix, layer, dims, c: _Collector, check_values: bool) -> int | None:
    n, words = dims["N"], dims["P"]
    if "weight_shape" not in layer:
        return 8 * words
    if not check_values:
        return 8 * words
    ws = np.asarray(layer["weight_shape"]).astype(np.int64).tolist()
    if ws[0] != n or not (0 < ws[1] <= 8 * words and -(-ws[1] // 8) == words):
        c.error(f"{prefix}.weight_shape", f"expected [N, K] with N = {n} and ceil(K/8) = {words} "
                                          f"(weight_packed is {(n, words)}), found {ws}")
        return 8 * words
    return int(ws[1])


def _check_group_size(prefix: str, algo: str, layer, dims, k: int | None, g: int, c: _Collector) -> None:
    """The description's top-level ``group_size`` against the scale's group count along K."""
    if k is None:
        return
    if algo in (A.W8A16, A.W4A16):
        groups, key = dims["G"], "weight_scale"
    elif algo == A.W4A8_DYNAMIC:
        if "weight_scale_second" not in layer:
            if 0 < g < k:
                c.error(f"{prefix}.weight", f"per-channel W4A8 (no weight_scale_second) but the description's "
                                            f"group_size is {g}: expected 0 (or >= K = {k})")
            return
        groups, key = dims["G2"], "weight_scale_second"
        if g <= 0 or k % g:
            c.error(f"{prefix}.{key}", f"two-step per-group W4A8 needs the description's group_size to divide "
                                       f"K = {k}, found group_size {g}")
            return
    else:
        return
    name = f"{prefix}.{key}"
    if groups == 1:
        if 0 < g < k:
            c.error(name, f"1 group (per-channel) but the description's group_size {g} gives "
                          f"ceil(K/g) = {-(-k // g)} groups for K = {k}")
        return
    if g <= 0:
        c.error(name, f"{groups} groups along K = {k} but the description's group_size is {g} "
                      "(per-channel); expected the group size")
        return
    if -(-k // g) != groups:
        c.error(name, f"group_size {g} gives ceil(K/g) = {-(-k // g)} groups for K = {k}, found {groups}")
    elif k % g:
        c.warn(name, f"group_size {g} does not divide K = {k}: ragged last group (msModelSlim never writes it)")


def _check_extra_values(prefix: str, algo: str, layer, dims, c: _Collector) -> None:
    if algo in (A.W8A8, A.W8A8_MIX):
        o = np.asarray(layer["input_offset"], dtype=np.float64).reshape(-1)
        if not (np.all(o == np.rint(o)) and np.all((o >= INT8_MIN) & (o <= INT8_MAX))):
            c.error(f"{prefix}.input_offset", f"expected an integer in [{INT8_MIN}, {INT8_MAX}] "
                                              f"(int8 zero point), found {o.tolist()}")
    if algo == A.W4A8_DYNAMIC:
        w = layer["weight"]
        if w.shape[0] == dims["N"] and w.size:
            lo, hi = int(np.min(w)), int(np.max(w))
            if lo < INT4_MIN or hi > INT4_MAX:
                c.error(f"{prefix}.weight", f"unpacked W4A8 layout [N, K] holds one int4 per byte, expected values "
                                            f"in [{INT4_MIN}, {INT4_MAX}], found range [{lo}, {hi}]")


def _check_fused(desc: QuantDescription, tensors, config: Mapping, c: _Collector, check_values: bool) -> None:
    model_type = (config.get("text_config") or {}).get("model_type") or config.get("model_type")
    mapping = {**_DEFAULT_FUSED, **packed_modules_for(model_type)}
    candidates: dict[str, None] = {}
    shard_to_fused: dict[str, str] = {}
    for fused, shards in mapping.items():
        for shard in shards:
            if not shard.startswith("experts."):
                shard_to_fused[shard] = fused
    for prefix in c.report.modules:
        m = _EXPERT.match(prefix)
        if m is not None:
            candidates.setdefault(m["experts"])
            continue
        parent, _, proj = prefix.rpartition(".")
        if proj in shard_to_fused:
            candidates.setdefault(f"{parent}.{shard_to_fused[proj]}" if parent else shard_to_fused[proj])
    for fused in candidates:
        shards = desc.shard_prefixes(fused, mapping)
        if not shards:
            continue
        values = {s: desc.get(s + ".weight") for s in shards if s + ".weight" in desc}
        if len(values) < 2:
            continue
        distinct = sorted(set(values.values()))
        if len(distinct) > 1:
            counts = {v: [s for s in values if values[s] == v] for v in distinct}
            shown = "; ".join(f"{v}: {', '.join(ss[:4])}{' ...' if len(ss) > 4 else ''}" for v, ss in counts.items())
            c.error(fused, f"fused shards must share one algorithm ID (vLLM runs them as one layer), found {shown}")
            continue
        algo = distinct[0]
        if not check_values or fused.endswith("experts") or algo not in _SHARED_PER_FUSED:
            continue
        first = next(iter(values))
        for suffix in _SHARED_PER_FUSED[algo]:
            ref_name = f"{first}.{suffix}"
            if ref_name not in tensors:
                continue
            ref = np.asarray(tensors[ref_name])
            for s in list(values)[1:]:
                name = f"{s}.{suffix}"
                if name not in tensors:
                    continue
                a = np.asarray(tensors[name])
                if a.shape != ref.shape or a.dtype != ref.dtype or a.tobytes() != ref.tobytes():
                    c.error(name, f"differs from {ref_name}: the shards of fused {fused} share one {suffix} "
                                  "(vLLM loads it once per fused layer; the last shard would win)")
