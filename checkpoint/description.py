"""``quant_model_description.json``: load, validate and query msModelSlim's per-tensor description.

The file is one flat JSON object (facts doc §4, msmodelslim-real-output.md): a few top-level keys
(``version`` "1.0.0", ``model_quant_type``, ``metadata`` {}, ``group_size`` int, ``optional`` {},
and rarer ones listed in :data:`TOP_LEVEL_KEYS`) and one entry per checkpoint tensor mapping its
name to an algorithm ID string (``"FLOAT"`` for norms, embeddings, biases, unquantized layers).
Only the value on ``<module>.weight`` selects a module's algorithm; ``model_quant_type`` is not
reliable (real W4A8 checkpoints say W8A8_DYNAMIC) and is never used for selection.

Fused modules (vLLM's ``qkv_proj``, ``gate_up_proj``, ``experts``, ...) have no entry of their
own: :func:`QuantDescription.layer_algorithm` reads every shard listed in a packed-modules mapping
(:data:`PACKED_MODULES_MODEL_MAPPING`, facts doc §3.6) and requires them to agree.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType

__all__ = [
    "DESCRIPTION_FILE",
    "FLOAT",
    "KNOWN_ALGORITHM_IDS",
    "PACKED_MODULES_MODEL_MAPPING",
    "TOP_LEVEL_KEYS",
    "QuantDescription",
    "packed_modules_for",
]

#: The file name msModelSlim writes and vLLM Ascend looks for.
DESCRIPTION_FILE = "quant_model_description.json"

FLOAT = "FLOAT"

#: Keys that are not tensor names (facts doc §4). Their values may be of any JSON type.
TOP_LEVEL_KEYS: frozenset[str] = frozenset({
    "version", "model_quant_type", "metadata", "group_size", "optional", "kv_cache_type",
    "kv_quant_type", "fa_quant_type", "indexer_quant_type", "is_rot_used", "max_supported_tp",
    "hc_head_fn", "ascend_quant_method", "weight_strategy", "quant_method",
})

#: Every algorithm string vLLM Ascend / msModelSlim are known to write (facts doc §4). Values
#: outside this set are still accepted in the file (new exporters add IDs); a layer that needs
#: one fails when a method is looked up for it, with the list of supported IDs.
KNOWN_ALGORITHM_IDS: frozenset[str] = frozenset({
    "FLOAT", "W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W8A16", "W4A16", "W4A8_DYNAMIC",
    "W4A4_FLATQUANT_DYNAMIC", "W4A4_DYNAMIC", "W8A8S", "W8A8SC", "W8A8_MXFP8", "W4A4_MXFP4",
    "W4A8_MXFP", "W4A16_MXFP4", "W8A8FP8_DYNAMIC", "WFP8AFP8_DYNAMIC", "FAQuant", "FAKQuant",
    "INT8_DYNAMIC", "W4A4_MXFP4_FLATQUANT", "C8",
})

_QKV = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
_GATE_UP = {"gate_up_proj": ("gate_proj", "up_proj")}
_EXPERTS = {"experts": ("experts.0.gate_proj", "experts.0.up_proj", "experts.0.down_proj")}
_QKV_A = {"fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa")}
_QWEN3_5 = {**_QKV, **_GATE_UP, "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),
            "in_proj_ba": ("in_proj_b", "in_proj_a")}
_DEEPSEEK = {**_GATE_UP, **_EXPERTS, **_QKV_A}
_DENSE = {**_QKV, **_GATE_UP}
_MOE = {**_QKV, **_GATE_UP, **_EXPERTS}

#: vLLM fused module name -> checkpoint shard names, per HF ``model_type``. vLLM Ascend v0.23's
#: table (facts doc §3.6) plus the dense and MoE families vLLM fuses the same way.
PACKED_MODULES_MODEL_MAPPING: Mapping[str, Mapping[str, tuple[str, ...]]] = MappingProxyType({
    # vLLM Ascend v0.23 modelslim_config.py
    "qwen3_moe": _MOE,
    "qwen3_5": _QWEN3_5,
    "qwen3_5_moe": {**_QWEN3_5, **_EXPERTS},
    **{t: _DEEPSEEK for t in ("deepseek_v2", "deepseek_v3", "kimi_k2", "deepseek_v32", "glm_moe_dsa",
                              "pangu_ultra_moe", "pangu_ultra_moe_mtp", "glm4_moe_lite", "longcat_flash")},
    "deepseek_v4": {**_GATE_UP, **_EXPERTS},
    "deepseek_mtp": {**_GATE_UP, **_EXPERTS},
    "qwen3_next": {**_QKV, **_GATE_UP, "in_proj": ("in_proj_qkvz", "in_proj_ba"), **_EXPERTS},
    "qwen2_5_vl": _DENSE,
    **{t: _MOE for t in ("qwen3_vl_moe", "glm4_moe", "glm4v_moe", "glm4v_moe_text", "step3p5",
                         "step3p5_mtp")},
    "minimax_m2": {**_QKV, "experts": ("experts.0.w1", "experts.0.w2", "experts.0.w3")},
    "qwen3_omni_moe": {**_QKV, "attn_qkv_proj": ("attn_q_proj", "attn_k_proj", "attn_v_proj"),
                       **_GATE_UP, **_EXPERTS},
    "qwen2_5_omni": {**_QKV, "attn_qkv_proj": ("attn_q_proj", "attn_k_proj", "attn_v_proj"),
                     "qkv": ("q", "k", "v"), **_GATE_UP},
    "bailing_hybrid": {**_GATE_UP, **_EXPERTS, **_QKV_A, "o_proj": ("dense",)},
    # dense / MoE families vLLM fuses with the same names (not in vLLM Ascend's table, which
    # relies on vLLM's own per-model mapping for them)
    **{t: _DENSE for t in ("llama", "qwen2", "qwen3", "mistral", "qwen3_vl", "qwen3_vl_text")},
    **{t: _MOE for t in ("qwen2_moe", "qwen3_vl_moe_text")},
})

# an expert shard of the mapping, e.g. "experts.0.gate_proj" -> ("experts", "gate_proj")
_EXPERT_SHARD = re.compile(r"^(?P<base>.*\bexperts)\.0\.(?P<proj>[^.]+)$")


def packed_modules_for(model_type: str | None,
                       fallback: Mapping[str, list[str] | tuple[str, ...]] | None = None
                       ) -> dict[str, tuple[str, ...]]:
    """The packed-modules mapping for ``model_type``: :data:`PACKED_MODULES_MODEL_MAPPING`'s
    entry merged over ``fallback`` (vLLM's per-model ``packed_modules_mapping``)."""
    out = {k: tuple(v) for k, v in (fallback or {}).items()}
    out.update(PACKED_MODULES_MODEL_MAPPING.get(model_type or "", {}))
    return out


class QuantDescription(Mapping):
    """A parsed ``quant_model_description.json`` (read-only mapping of tensor name -> algorithm).

    Construct with :meth:`load` (file or model directory) or :meth:`from_dict`. Iterating yields
    tensor names only; top-level keys are in :attr:`top_level`. Aliases: a ``<x>.weight_packed``
    entry (LLM-Compressor naming) also answers for ``<x>.weight`` (vLLM Ascend
    ``_apply_extra_quant_adaptations``).
    """

    def __init__(self, entries: Mapping[str, str], top_level: Mapping[str, object], source: str = "<dict>"):
        self._entries = dict(entries)
        self._top = dict(top_level)
        self.source = source
        self._aliases: dict[str, str] = {}
        for name in self._entries:
            if name.endswith(".weight_packed"):
                alias = name[: -len("_packed")]
                if alias not in self._entries:
                    self._aliases[alias] = name

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "<dict>") -> QuantDescription:
        """Validate and wrap a description dict. Raises ``ValueError`` naming the key at fault."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        entries: dict[str, str] = {}
        top: dict[str, object] = {}
        for key, value in data.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"{source}: invalid key {key!r}")
            if key in TOP_LEVEL_KEYS:
                top[key] = value
                continue
            if not isinstance(value, str):
                raise ValueError(
                    f"{source}: entry {key!r} must map a tensor name to an algorithm ID string, got "
                    f"{type(value).__name__} {value!r}"
                )
            entries[key] = value
        if "version" in top and not isinstance(top["version"], str):
            raise ValueError(f"{source}: 'version' must be a string, got {top['version']!r}")
        if "model_quant_type" in top and not isinstance(top["model_quant_type"], str):
            raise ValueError(f"{source}: 'model_quant_type' must be a string, got {top['model_quant_type']!r}")
        gs = top.get("group_size", 0)
        if isinstance(gs, bool) or not isinstance(gs, int) or gs < 0:
            raise ValueError(f"{source}: 'group_size' must be a non-negative integer, got {gs!r}")
        for key in ("metadata", "optional"):
            if key in top and not isinstance(top[key], dict):
                raise ValueError(f"{source}: {key!r} must be a JSON object, got {top[key]!r}")
        if not entries:
            raise ValueError(f"{source}: no per-tensor entries (is this a quant_model_description.json?)")
        return cls(entries, top, source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantDescription:
        """Read ``path`` (the JSON file, or a model directory holding :data:`DESCRIPTION_FILE`)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, DESCRIPTION_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no {DESCRIPTION_FILE} (msModelSlim writes it next to the weights)")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON: {e}") from None
        return cls.from_dict(data, source=path)

    def to_dict(self) -> dict[str, object]:
        """The JSON object (top-level keys first, then tensor entries; aliases not included)."""
        return {**self._top, **self._entries}

    def renamed(self, fn: Callable[[str], str | None]) -> QuantDescription:
        """A copy with every tensor name passed through ``fn`` (``None`` drops the entry);
        used for vLLM's ``apply_vllm_mapper``."""
        entries = {}
        for k, v in self._entries.items():
            new = fn(k)
            if new is not None:
                entries[new] = v
        return QuantDescription(entries, self._top, self.source)

    # -- mapping protocol (tensor entries + aliases) -------------------------------------------

    def __getitem__(self, name: str) -> str:
        if name in self._entries:
            return self._entries[name]
        return self._entries[self._aliases[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    # -- top-level values --------------------------------------------------------------

    @property
    def top_level(self) -> Mapping[str, object]:
        return MappingProxyType(self._top)

    @property
    def version(self) -> str:
        """``"1.0.0"`` for msModelSlim's v1 exporter; ``"0"`` when absent (vLLM Ascend's default)."""
        return str(self._top.get("version", "0"))

    @property
    def model_quant_type(self) -> str | None:
        return self._top.get("model_quant_type")  # type: ignore[return-value]

    @property
    def group_size(self) -> int:
        return int(self._top.get("group_size", 0))  # type: ignore[arg-type]

    # -- per-module queries --------------------------------------------------------------

    def algorithms(self) -> Counter:
        """How many modules (``<module>.weight`` entries) use each algorithm ID."""
        return Counter(v for k, v in self._entries.items() if k.endswith(".weight"))

    def module_tensors(self, prefix: str) -> dict[str, str]:
        """``{suffix: algorithm}`` of the tensors ``<prefix>.<suffix>`` (suffix without dots)."""
        head = prefix + "."
        return {k[len(head):]: v for k, v in self._entries.items()
                if k.startswith(head) and "." not in k[len(head):]}

    def shard_prefixes(self, prefix: str, packed_modules: Mapping[str, tuple[str, ...] | list[str]] | None
                       ) -> list[str] | None:
        """Checkpoint prefixes of the shards of fused module ``prefix``, or None if not fused.

        The last name component is looked up in ``packed_modules``; each shard name replaces it
        (vLLM Ascend uses ``str.replace`` on the whole prefix, which also rewrites an earlier
        component of the same name; we replace only the last one). For MoE ``experts`` the
        mapping's ``experts.0.<proj>`` shards are expanded to every expert present in the
        description (vLLM Ascend inspects expert 0 only, facts doc §9.12; we check them all).
        """
        if not packed_modules:
            return None
        parent, _, proj = prefix.rpartition(".")
        shards = packed_modules.get(proj)
        if not shards:
            return None
        base = f"{parent}." if parent else ""
        out: list[str] = []
        for shard in shards:
            m = _EXPERT_SHARD.match(shard)
            if m is None:
                out.append(base + shard)
                continue
            # shard "experts.0.gate_proj": replace the fused "experts" by "experts.<e>.gate_proj"
            experts_prefix = base + proj
            ids = self.expert_ids(experts_prefix)
            out.extend(f"{experts_prefix}.{e}.{m['proj']}" for e in (ids or [0]))
        return out

    def expert_ids(self, experts_prefix: str) -> list[int]:
        """Sorted expert indices ``e`` with entries under ``<experts_prefix>.<e>.``."""
        pat = re.compile(re.escape(experts_prefix) + r"\.(\d+)\.")
        return sorted({int(m.group(1)) for k in self._entries for m in [pat.match(k)] if m})

    def layer_algorithm(self, prefix: str,
                        packed_modules: Mapping[str, tuple[str, ...] | list[str]] | None = None
                        ) -> str | None:
        """The algorithm ID of module ``prefix`` (``"FLOAT"`` when unquantized), or None if the
        description has no ``.weight`` entry for it (or for any of its shards).

        Fused modules: every shard's ``<shard>.weight`` must be present and equal; otherwise
        ``ValueError`` names each shard with its value.
        """
        shards = self.shard_prefixes(prefix, packed_modules)
        if shards is None:
            return self.get(prefix + ".weight")
        values = {s + ".weight": self.get(s + ".weight") for s in shards}
        found = {s: v for s, v in values.items() if v is not None}
        if not found:
            # transformers >= 5 stores unquantized experts fused: "<experts>.gate_up_proj" and
            # "<experts>.down_proj" (no ".weight"); msModelSlim copies them as FLOAT
            fused = {f"{prefix}.{n}": self.get(f"{prefix}.{n}") for n in ("gate_up_proj", "down_proj")}
            if prefix.rsplit(".", 1)[-1] == "experts" and all(v is not None for v in fused.values()):
                values = fused
            else:
                return None
        distinct = set(values.values())
        if len(distinct) > 1:
            shown = values
            if len(values) > 8:  # many experts: name the majority value and every shard that differs
                common, count = Counter(values.values()).most_common(1)[0]
                shown = {s: v for s, v in values.items() if v != common}
                shown = {f"({count} shards)": common, **shown}
            listing = ", ".join(f"{s}={v if v is not None else '<missing>'}" if not s.startswith("(")
                                else f"{s} {v}" for s, v in shown.items())
            raise ValueError(
                f"{self.source}: the shards of fused module {prefix!r} must share one algorithm ID "
                f"(vLLM runs them as one layer), got {listing}"
            )
        return distinct.pop()

    def is_float(self, prefix: str, packed_modules=None) -> bool:
        return self.layer_algorithm(prefix, packed_modules) == FLOAT
