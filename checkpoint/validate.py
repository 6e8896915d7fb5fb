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
  float bias (float dtype, shape ``(N,)``), FLOAT modules stored as floats; a group size that
  does not divide K (a ragged last group is ambiguous in a checkpoint: several group sizes fit
  the same scales); W8A8 ``quant_bias`` that could push the int32 accumulator out of range;
  values that break once held in the model dtype (``config.json``'s, float32 if absent):
  scales rounding to 0 or inf, an infinite static ``1/input_scale``, W4A8 per-group scales
  ``weight_scale * weight_scale_second`` out of float32, overflowing FlatQuant factors or biases;
* fused shards (q/k/v, gate/up, every expert of one MoE layer) share one algorithm ID, and the
  per-tensor parameters vLLM loads once per fused layer (W8A8 ``input_scale``/``input_offset``,
  FlatQuant ``left_trans``/``right_trans``/``clip_ratio``) are identical across the shards;
* every MoE experts block (all projections present for every expert) passes the MoE reference's
  own load-time validation (:func:`reference.moe.moe_forward` on zero tokens: e.g. the W4A8
  per-group scale rounded to fp16).

:func:`check_tensors` runs the same checks on a description dict and any mapping of tensor name ->
array (e.g. a lazy reader). The vLLM integration runs :func:`validate_checkpoint` at load time
(``vllm_integration.config``), ``ascend-quant inspect`` prints its report. Nothing is ever
written. Cost: shards are opened by :func:`checkpoint.io.read_safetensors` (header parsed, the file
memory-mapped read-only, one map per shard), so only the tensors a check touches are read: the
headers always; with ``check_values`` the scales, offsets, biases and FlatQuant factors (small),
and in full only int4 weights stored one per byte (W4A4_DYNAMIC, FlatQuant, unpacked W4A8), about
0.4 s/GiB from the page cache; int8 and packed int4 weights are not read (a W8A8 weight only when
its ``quant_bias`` lies within 128 * 128 * K of the int32 limit). All problems are collected;
:meth:`CheckpointReport.raise_if_errors` raises them as one :class:`~checkpoint.errors.CheckpointError`.
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
from ..reference.activation_quant import static_quant_params
from ..reference.flatquant import transform_shapes
from ..reference.linear import EXPECTED_TENSORS, validate_tensors
from ..reference.moe import moe_forward
from ..reference.rounding import INT4_MAX, INT4_MIN, INT8_MAX, INT8_MIN, round_through
from ..reference.rounding import model_dtype as parse_model_dtype
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
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
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

_UNREADABLE = object()


def _load_json(path: str, c: _Collector, what: str):
    """The parsed file (``null`` included), or :data:`_UNREADABLE` after reporting why."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        c.error(os.path.basename(path), f"invalid JSON ({what}): {e.msg} at line {e.lineno} column {e.colno}")
    except UnicodeDecodeError as e:
        c.error(os.path.basename(path), f"not UTF-8 text ({what}): {e}")
    except OSError as e:
        c.error(os.path.basename(path), f"unreadable ({what}): {e.strerror or e}")
    return _UNREADABLE


def _read_shard(path: str, c: _Collector) -> dict[str, np.ndarray] | None:
    try:
        return read_safetensors(path)
    except CheckpointError as e:
        msg = f"{e.key}: {e.problem}" if e.key else e.problem
    except OSError as e:
        msg = f"{type(e).__name__}: {e.strerror or e}"
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
        if index is not _UNREADABLE:
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
        if data is not _UNREADABLE:
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
        elif loaded is not _UNREADABLE:
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

    model_type, model_dtype = _config_facts(config, c)
    for prefix in modules:
        if any(n in lost for n in members[prefix].values()):
            c.report.modules[prefix] = ModuleInfo(prefix, desc.get(prefix + ".weight", "?"))
            continue
        _check_module(prefix, members[prefix], desc, tensors, c, check_values, model_dtype)

    _check_fused(desc, tensors, model_type, c, check_values)
    dt = _model_dtype_or_none(model_dtype)
    if check_values and dt is not None:
        _check_moe_blocks(desc, tensors, dt, c)


def _config_facts(config: Mapping, c: _Collector) -> tuple[str | None, str]:
    """``(model_type, model dtype name)`` from ``config.json`` (the text config of a multimodal
    one); values of the wrong JSON type are reported and ignored."""
    text = config.get("text_config")
    if text is not None and not isinstance(text, Mapping):
        c.error("config.json", f"'text_config' must be a JSON object, found {text!r:.60}")
        text = None
    found: dict[str, str] = {}
    for where, cfg in (("text_config.", text or {}), ("", config)):
        for key in ("model_type", "torch_dtype", "dtype"):
            v = cfg.get(key)
            if v is None:
                continue
            if not isinstance(v, str):
                c.error("config.json", f"'{where}{key}' must be a string, found {v!r:.60}")
                continue
            found.setdefault("model_type" if key == "model_type" else "dtype", v)
    return found.get("model_type"), found.get("dtype", "")


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
    dt = _model_dtype_or_none(model_dtype)
    if check_values:
        _check_extra_values(prefix, algo, layer, dims, c)
        if dt is not None and expert_of is None:
            _check_model_dtype_values(prefix, algo, layer, dt, c)
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
        elif check_values and dt is not None and not np.isfinite(round_through(a, dt)).all():
            c.error(name, f"expected values finite in the model dtype {dt} (the layer holds the bias in it), "
                          f"found a value that overflows it")


def _model_dtype_or_none(name: str):
    """The model dtype named by ``config.json`` (float32 when it names none), or None when it
    names another type (then the checks that depend on it are skipped)."""
    try:
        return parse_model_dtype(name or "float32")
    except ValueError:
        return None


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
        # The reference and the kernels compute a ragged last group, but in a checkpoint it is
        # ambiguous: every group size g' with ceil(K/g') = G gives the same scale shape, so a
        # wrong group_size would load silently. msModelSlim always writes whole groups.
        c.error(name, f"group_size {g} does not divide K = {k}: expected a divisor of K (msModelSlim writes whole "
                      f"groups; with a ragged last group any group size giving {groups} groups fits these scales)")


def _check_extra_values(prefix: str, algo: str, layer, dims, c: _Collector) -> None:
    if algo in (A.W8A8, A.W8A8_MIX):
        o = np.asarray(layer["input_offset"], dtype=np.float64).reshape(-1)
        if not (np.all(o == np.rint(o)) and np.all((o >= INT8_MIN) & (o <= INT8_MAX))):
            c.error(f"{prefix}.input_offset", f"expected an integer in [{INT8_MIN}, {INT8_MAX}] "
                                              f"(int8 zero point), found {o.tolist()}")
    if algo in (A.W8A8, A.W8A8_MIX):
        _check_quant_bias_headroom(prefix, layer, dims["K"], c)
    if algo == A.W4A8_DYNAMIC:
        w = layer["weight"]
        if w.shape[0] == dims["N"] and w.size:
            lo, hi = int(np.min(w)), int(np.max(w))
            if lo < INT4_MIN or hi > INT4_MAX:
                c.error(f"{prefix}.weight", f"unpacked W4A8 layout [N, K] holds one int4 per byte, expected values "
                                            f"in [{INT4_MIN}, {INT4_MAX}], found range [{lo}, {hi}]")


def _check_quant_bias_headroom(prefix: str, layer, k: int, c: _Collector) -> None:
    """``acc + quant_bias`` must stay in int32 for every int8 input (the reference raises
    ``OverflowError`` at run time, the NPU would wrap silently): cheap bound first
    (``|q_x * w| <= 128 * 128``), the exact per-row range over int8 inputs only if it fails."""
    qb = np.asarray(layer["quant_bias"]).astype(np.int64).reshape(-1)
    if qb.size == 0 or int(np.max(np.abs(qb))) <= INT32_MAX - 128 * 128 * k:
        return
    w = layer["weight"]
    hi = np.empty(w.shape[0], np.int64)
    lo = np.empty(w.shape[0], np.int64)
    for r in range(0, w.shape[0], 256):  # row blocks: bounded memory on large layers
        b = np.asarray(w[r: r + 256]).astype(np.int64)
        hi[r: r + 256] = np.maximum(INT8_MAX * b, INT8_MIN * b).sum(axis=1)  # largest accumulator over int8 x
        lo[r: r + 256] = np.minimum(INT8_MAX * b, INT8_MIN * b).sum(axis=1)
    bad = np.nonzero((qb + hi > INT32_MAX) | (qb + lo < INT32_MIN))[0]
    if bad.size:
        n = int(bad[0])
        c.error(f"{prefix}.quant_bias", f"expected values that keep the int32 accumulator in range for every int8 "
                                        f"input, found quant_bias[{n}] = {int(qb[n])}, which with row {n}'s weights "
                                        f"reaches [{int(qb[n] + lo[n])}, {int(qb[n] + hi[n])}] "
                                        f"({bad.size} such row(s); int32 is [{INT32_MIN}, {INT32_MAX}])")


#: Linear tensors the reference (like vLLM Ascend) holds in the model dtype: loaded by ``copy_`` into
#: a model-dtype parameter, i.e. rounded once (numerics §3); scales must stay finite and > 0 there,
#: the others finite. W4A8_DYNAMIC, W4A4_DYNAMIC and FlatQuant weight scales stay float32.
_MODEL_DTYPE_TENSORS = {
    A.W8A16: ("weight_scale", "weight_offset"),
    A.W4A16: ("weight_scale",),
    A.W8A8: ("input_scale", "input_offset"),
    A.W8A8_DYNAMIC: ("weight_scale",),
    A.W8A8_MIX: ("weight_scale", "input_scale", "input_offset"),
    A.W4A4_FLATQUANT_DYNAMIC: ("left_trans", "right_trans"),
}


def _check_model_dtype_values(prefix: str, algo: str, layer, dt, c: _Collector) -> None:
    """What breaks once the values are held in the model dtype ``dt`` (the reference raises at the
    first forward, vLLM would compute inf/NaN): the tensors of :data:`_MODEL_DTYPE_TENSORS`
    rounded to ``dt``, the static ``1/input_scale`` (computed in ``dt``), and the W4A8 two-step
    scale ``f32(weight_scale * weight_scale_second)``. Linear modules only: MoE experts are
    checked by the MoE reference's own load-time rules (:func:`_check_moe_blocks`)."""
    for suffix in _MODEL_DTYPE_TENSORS.get(algo, ()):
        a = layer.get(suffix)
        if a is None or a.size == 0:
            continue
        r = round_through(a, dt)
        is_scale = suffix.endswith("scale")
        bad = ~(np.isfinite(r) & (r > 0)) if is_scale else ~np.isfinite(r)
        if bad.any():
            i = np.unravel_index(int(np.argmax(bad)), r.shape)
            c.error(f"{prefix}.{suffix}", f"expected values {'finite and > 0' if is_scale else 'finite'} in the model "
                                          f"dtype {dt} (the layer holds it in {dt}), found "
                                          f"{float(np.asarray(a, dtype=np.float32)[i])!r} at index "
                                          f"{tuple(map(int, i))}, which becomes {float(r[i])!r}")
            return
    if algo in (A.W8A8, A.W8A8_MIX):
        with np.errstate(over="ignore"):
            recip, _ = static_quant_params(layer["input_scale"], layer["input_offset"], dt)
        if not np.isfinite(recip):
            c.error(f"{prefix}.input_scale", f"expected 1/input_scale finite in the model dtype {dt}, found "
                                             f"input_scale {float(np.asarray(layer['input_scale']).reshape(-1)[0])!r} "
                                             f"whose reciprocal is {float(recip)!r}")
    if algo == A.W4A8_DYNAMIC and "weight_scale_second" in layer:
        s1 = np.asarray(layer["weight_scale"], dtype=np.float32).reshape(-1, 1)
        with np.errstate(over="ignore", under="ignore"):
            prod = (s1 * np.asarray(layer["weight_scale_second"], dtype=np.float32)).astype(np.float32)
        bad = ~(np.isfinite(prod) & (prod > 0))
        if bad.any():
            i = np.unravel_index(int(np.argmax(bad)), prod.shape)
            c.error(f"{prefix}.weight_scale_second", f"expected weight_scale * weight_scale_second finite and > 0 in "
                                                     f"float32 (the per-group scale), found {float(prod[i])!r} at "
                                                     f"index {tuple(map(int, i))}")


def _check_moe_blocks(desc: QuantDescription, tensors, dt, c: _Collector) -> None:
    """Every MoE experts block whose projections passed the per-module checks goes through the MoE
    reference's load-time validation (:func:`reference.moe.moe_forward` on zero tokens checks every
    expert's shapes, scales after their load-time rounding, e.g. fp16 for W4A8 per-group, and
    offsets without computing anything)."""
    blocks: dict[str, dict[int, dict[str, dict[str, np.ndarray]]]] = defaultdict(lambda: defaultdict(dict))
    algos: dict[str, set[str]] = defaultdict(set)
    for prefix, info in c.report.modules.items():
        m = _EXPERT.match(prefix)
        if m is None:
            continue
        if not info.tensors:  # in a missing or unreadable shard (reported once, per shard)
            algos[m["experts"]].add("<lost>")
            continue
        algos[m["experts"]].add(info.algorithm)
        head = prefix + "."
        blocks[m["experts"]][int(m["e"])][m["proj"]] = {
            suffix: tensors[head + suffix] for suffix in info.tensors if suffix not in _FLOAT_EXTRAS}
    for experts, by_index in blocks.items():
        if len(algos[experts]) != 1 or any(k.startswith(experts + ".") for k in c.keys_with_errors):
            continue  # reported already (fused shards disagree, or a projection failed its checks)
        algo = next(iter(algos[experts]))
        if algo not in A.MOE_ALGORITHMS:
            continue
        projections = set().union(*(set(p) for p in by_index.values()))
        gaps = [f"{experts}.{e}.{p}" for e in range(max(by_index) + 1) for p in sorted(projections)
                if p not in by_index.get(e, {})]
        if gaps:
            c.error(gaps[0], f"missing: the other experts of {experts} have a {gaps[0].rsplit('.', 1)[-1]} "
                             f"projection ({len(gaps)} projection(s) missing, experts numbered 0..{max(by_index)})")
            continue
        expert_list = [by_index[e] for e in sorted(by_index)]
        try:
            hidden = int(expert_list[0]["down_proj"]["weight_scale"].shape[0])
        except (KeyError, IndexError):
            continue  # a projection is missing: reported by the per-module checks
        try:
            moe_forward(algo, np.zeros((0, hidden), dt), expert_list, np.zeros((0, 1), np.float32),
                        np.zeros((0, 1), np.int64), dtype=dt, group_size=desc.group_size or None)
        except ValueError as e:
            key, _, problem = str(e).partition(": ")
            parent = experts.rsplit(".", 1)[0]
            c.error(f"{parent}.{key}" if key.startswith("experts.") else experts, problem if problem else str(e))


def _check_fused(desc: QuantDescription, tensors, model_type: str | None, c: _Collector, check_values: bool) -> None:
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
