"""Quantize a float Hugging Face safetensors model directory into msModelSlim's layout.

Every 2-D ``<module>.weight`` of a linear layer is quantized with the reference quantizer of its
algorithm ID (``reference.weight_quant``); MoE experts are quantized per expert
(``mlp.experts.{e}.{gate,up,down}_proj``, msModelSlim's layout; HF's fused
``experts.gate_up_proj`` / ``experts.down_proj`` tensors are split first). Embeddings, norms,
biases, the MoE router (unless ``quantize_router``) and ``lm_head`` (unless
``quantize_lm_head``) are copied as ``FLOAT``. The output is written by
:func:`checkpoint.io.write_quantized_model`.

This is the simple path msModelSlim's ``minmax`` processors take (no smoothing, no GPTQ):

* W8A8 / W8A8_MIX static activation parameters come from calibration activations: either
  given per layer (``activations={prefix: array}``) or collected by running the float model on
  ``calibration_token_ids`` (:func:`collect_activations`, needs torch + transformers).
* W4A4_FLATQUANT_DYNAMIC transforms are not learned: each layer gets seeded random orthogonal
  factors (``flatquant_seed``; ``None`` gives identities) and ``flatquant_clip_ratio``; o_proj
  layers get only ``left_trans`` of size ``[num_heads, num_heads]``, as real msModelSlim output.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..reference import algorithms as A
from ..reference import weight_quant as wq
from ..reference.flatquant import decompose_dim
from .description import FLOAT, QuantDescription
from .calibration_forward import observe_module_inputs
from .io import read_safetensors, write_quantized_model

__all__ = [
    "ROW_PARALLEL_PROJECTIONS",
    "QuantRecipe",
    "collect_activations",
    "load_float_model",
    "plan_layers",
    "quantize_model",
]

#: Projections vLLM shards along their input dim (RowParallelLinear); msModelSlim writes their
#: W4A8 ``scale_bias`` as ``[N, 16]`` (16 K-chunks) instead of ``[N, 1]``.
ROW_PARALLEL_PROJECTIONS = frozenset({"o_proj", "down_proj", "out_proj", "dense", "dense_4h_to_h", "w2"})

_EXPERT_RE = re.compile(r"^(?P<experts>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)\.weight$")
_FUSED_EXPERTS_RE = re.compile(r"^(?P<experts>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
_ROUTER_SUFFIXES = (".mlp.gate", ".block_sparse_moe.gate", ".shared_expert_gate")
_DEFAULT_GROUP = {A.W4A16: 32}


@dataclass(frozen=True)
class QuantRecipe:
    """Which algorithm each layer gets, and the quantizers' options.

    Attributes:
        algorithm: algorithm ID (or ``"FLOAT"``) of every linear layer not overridden.
        moe_algorithm: algorithm ID of MoE experts (``None``: ``algorithm`` if it is a MoE
            algorithm, else the experts stay FLOAT).
        overrides: ``(pattern, ID)`` pairs, shell-style patterns on the module prefix
            (e.g. ``("*.down_proj", "FLOAT")``); the first match wins; experts are matched
            by ``<...>.experts`` too.
        quantize_lm_head / quantize_router: also quantize ``lm_head`` / the MoE router with
            ``algorithm`` (msModelSlim's ``include: ["*"]`` quantizes the router).
        group_size: per-group size for W8A16, W4A8_DYNAMIC (two-step) and W4A16; ``None`` =
            the algorithm's default (W4A16: 32, others 0 = per channel). Written as the
            description's top-level ``group_size``, so all grouped layers must share it.
        w8a16_symmetric: W8A16 symmetric (zero offsets) or asymmetric.
        flatquant_clip_ratio / flatquant_seed: see the module docstring.
        flatquant_shared: the projections reading the same input (q/k/v, gate/up) share one pair
            of factors, as msModelSlim writes them (vLLM runs each group as one fused linear
            with one activation transform). False gives every projection its own factors (a
            test case: vLLM Ascend would keep only the last shard's; we run such shards apart).
        deq_scale_dtype: W8A8 ``deq_scale`` storage: ``"int64"`` (float32 bits, msModelSlim for
            fp32/fp16 sources), ``"float32"`` (bf16 sources) or ``"auto"`` (by the source dtype).
    """

    algorithm: str
    moe_algorithm: str | None = None
    overrides: tuple[tuple[str, str], ...] = ()
    quantize_lm_head: bool = False
    quantize_router: bool = False
    group_size: int | None = None
    w8a16_symmetric: bool = True
    flatquant_clip_ratio: float = 1.0
    flatquant_seed: int | None = 0
    flatquant_shared: bool = True
    deq_scale_dtype: str = "auto"

    def algorithm_for(self, prefix: str, kind: str) -> str:
        """Algorithm ID of module ``prefix``; ``kind`` is "linear", "moe", "lm_head" or "router"."""
        for pattern, algo in self.overrides:
            if fnmatch.fnmatchcase(prefix, pattern):
                return algo
        if kind == "moe":
            if self.moe_algorithm is not None:
                return self.moe_algorithm
            return self.algorithm if self.algorithm in A.MOE_ALGORITHMS else FLOAT
        if kind == "lm_head" and not self.quantize_lm_head:
            return FLOAT
        if kind == "router" and not self.quantize_router:
            return FLOAT
        return self.algorithm


# ---------------------------------------------------------------------------------------
# reading the float model
# ---------------------------------------------------------------------------------------

def load_float_model(src_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config.json dict, {name: array})`` of a float HF safetensors model directory.
    HF's fused expert tensors (``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj``
    ``[E, H, I]``) are split into per-expert ``experts.{e}.{gate,up,down}_proj.weight``."""
    src_dir = os.fspath(src_dir)
    with open(os.path.join(src_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    files = sorted(fn for fn in os.listdir(src_dir) if fn.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{src_dir}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for fn in files:
        for name, arr in read_safetensors(os.path.join(src_dir, fn)).items():
            m = _FUSED_EXPERTS_RE.match(name)
            if m is None:
                tensors[name] = arr
                continue
            if arr.ndim != 3:
                raise ValueError(f"{name}: expected a fused [E, out, in] expert tensor, got shape {arr.shape}")
            for e in range(arr.shape[0]):
                base = f"{m['experts']}.{e}"
                if m["kind"] == "gate_up_proj":
                    inter = arr.shape[1] // 2
                    tensors[f"{base}.gate_proj.weight"] = arr[e, :inter]
                    tensors[f"{base}.up_proj.weight"] = arr[e, inter:]
                else:
                    tensors[f"{base}.down_proj.weight"] = arr[e]
    return config, tensors


def _text_config(config: Mapping) -> Mapping:
    return config.get("text_config") or config


def _kind(prefix: str) -> str:
    if prefix == "lm_head" or prefix.endswith(".lm_head"):
        return "lm_head"
    if prefix.endswith(_ROUTER_SUFFIXES):
        return "router"
    return "linear"


def plan_layers(tensors: Mapping[str, np.ndarray], recipe: QuantRecipe) -> dict[str, tuple[str, str]]:
    """``{module prefix: (kind, algorithm ID)}`` for every linear/expert projection.

    Linear modules are the 2-D ``<prefix>.weight`` tensors whose name does not contain
    ``embed``; expert projections are ``<...>.experts.<e>.<proj>`` (kind "moe", all experts of
    one layer share the layer's algorithm).
    """
    plan: dict[str, tuple[str, str]] = {}
    for name, arr in tensors.items():
        if not name.endswith(".weight") or arr.ndim != 2 or "embed" in name:
            continue
        prefix = name[: -len(".weight")]
        m = _EXPERT_RE.match(name)
        if m is not None:
            plan[prefix] = ("moe", recipe.algorithm_for(m["experts"], "moe"))
            continue
        kind = _kind(prefix)
        plan[prefix] = (kind, recipe.algorithm_for(prefix, kind))
    for prefix, (kind, algo) in plan.items():
        if algo == FLOAT:
            continue
        layer = "moe" if kind == "moe" else "linear"
        try:
            A.check_algorithm(algo, layer)
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}") from None
    return plan


# ---------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------

def collect_activations(src_dir: str | os.PathLike, token_ids: Sequence[Sequence[int]],
                        prefixes: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run the float model (float32, transformers) on each token sequence and record the input
    of every named module in ``prefixes`` (default: every ``nn.Linear`` and every MoE
    ``*.experts`` module) as a float32 ``[tokens, features]`` array, concatenated over sequences.

    An ``experts`` module's input is its MoE block input (all tokens, before routing).
    """
    import torch

    wanted = set(prefixes) if prefixes is not None else None
    store: dict[str, list[np.ndarray]] = {}

    def select(name: str, module) -> bool:
        if wanted is not None:
            return name in wanted
        return isinstance(module, torch.nn.Linear) or name.endswith(".experts")

    observe_module_inputs(src_dir, token_ids, select, lambda name, x: store.setdefault(name, []).append(x))
    return {k: np.concatenate(v, axis=0) for k, v in store.items()}


def _calibration(activations: Mapping[str, np.ndarray] | None, prefix: str) -> np.ndarray:
    if activations is None or prefix not in activations:
        raise ValueError(
            f"{prefix}: W8A8 static quantization needs calibration activations for this layer "
            "(pass activations={prefix: array} or calibration_token_ids)"
        )
    return np.asarray(activations[prefix])


def _expert_calibration(activations, experts_prefix: str, e: int, proj: str, weights: Mapping[str, np.ndarray]
                        ) -> np.ndarray:
    """Calibration input of one expert projection: given per projection, or derived from the MoE
    block input (all tokens, not only those routed to expert ``e``; simple path): gate/up see the
    block input, down sees ``silu(x @ gate^T) * (x @ up^T)`` in float64."""
    key = f"{experts_prefix}.{e}.{proj}"
    if activations is not None and key in activations:
        return np.asarray(activations[key])
    x = _calibration(activations, experts_prefix).astype(np.float64)
    if proj in ("gate_proj", "up_proj", "w1", "w3"):
        return x
    gate = np.asarray(weights[f"{experts_prefix}.{e}.gate_proj.weight"], dtype=np.float64)
    up = np.asarray(weights[f"{experts_prefix}.{e}.up_proj.weight"], dtype=np.float64)
    g = x @ gate.T
    return g / (1.0 + np.exp(-g)) * (x @ up.T)


# ---------------------------------------------------------------------------------------
# the quantization pass
# ---------------------------------------------------------------------------------------

def _orthogonal(n: int, rng: np.random.Generator | None) -> np.ndarray:
    if rng is None:
        return np.eye(n, dtype=np.float32)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _flatquant_factors(prefix: str, k: int, config: Mapping, rng) -> tuple[np.ndarray, np.ndarray | None]:
    proj = prefix.rsplit(".", 1)[-1]
    if proj == "o_proj":
        heads = int(_text_config(config).get("num_attention_heads", 0))
        if heads <= 0 or k % heads:
            raise ValueError(f"{prefix}: FlatQuant o_proj needs K={k} divisible by num_attention_heads={heads}")
        return _orthogonal(heads, rng), None
    left, right = decompose_dim(k)
    return _orthogonal(left, rng), _orthogonal(right, rng)


#: projections that read the same input (one fused linear in vLLM) -> the fused name
_INPUT_GROUPS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def _input_group(prefix: str) -> str:
    parent, _, proj = prefix.rpartition(".")
    return f"{parent}.{_INPUT_GROUPS.get(proj, proj)}"


def _source_deq_dtype(recipe: QuantRecipe, config: Mapping) -> str:
    if recipe.deq_scale_dtype != "auto":
        return recipe.deq_scale_dtype
    dt = str(_text_config(config).get("torch_dtype") or config.get("dtype") or "float32")
    return "float32" if "bfloat16" in dt else "int64"


def _effective_group(algo: str, recipe: QuantRecipe) -> int:
    if recipe.group_size is not None:
        return int(recipe.group_size)
    return _DEFAULT_GROUP.get(algo, 0)


def _quantize_projection(algo: str, prefix: str, w: np.ndarray, bias, calib, recipe: QuantRecipe,
                         config: Mapping, deq_dtype: str, rng, *,
                         flatquant_factors: tuple[np.ndarray, np.ndarray | None] | None = None
                         ) -> dict[str, np.ndarray]:
    proj = prefix.rsplit(".", 1)[-1]
    g = _effective_group(algo, recipe)
    if algo == A.W8A16:
        return wq.quantize_w8a16(w, symmetric=recipe.w8a16_symmetric, group_size=g, name=f"{prefix}.weight")
    if algo == A.W8A8_DYNAMIC:
        return wq.quantize_w8a8_dynamic(w, name=f"{prefix}.weight")
    if algo in (A.W8A8, A.W8A8_MIX):
        s_in, o_in = wq.calibrate_input_scale_offset(calib(), name=f"{prefix} calibration activations")
        fn = wq.quantize_w8a8_static if algo == A.W8A8 else wq.quantize_w8a8_mix
        return fn(w, s_in, o_in, bias=bias, deq_scale_dtype=deq_dtype, name=f"{prefix}.weight")
    if algo == A.W4A8_DYNAMIC:
        return wq.quantize_w4a8_dynamic(w, group_size=g, row_parallel=proj in ROW_PARALLEL_PROJECTIONS,
                                        name=f"{prefix}.weight")
    if algo == A.W4A4_DYNAMIC:
        return wq.quantize_w4a4_dynamic(w, name=f"{prefix}.weight")
    if algo == A.W4A4_FLATQUANT_DYNAMIC:
        left, right = flatquant_factors or _flatquant_factors(prefix, w.shape[1], config, rng)
        return wq.quantize_w4a4_flatquant(w, left, right, recipe.flatquant_clip_ratio, name=f"{prefix}.weight")
    if algo == A.W4A16:
        return wq.quantize_w4a16(w, group_size=g, name=f"{prefix}.weight")
    raise ValueError(f"{prefix}: unsupported algorithm ID {algo!r}; supported: {', '.join(A.LINEAR_ALGORITHMS)}")


def quantize_model(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: QuantRecipe | str,
    *,
    activations: Mapping[str, np.ndarray] | None = None,
    calibration_token_ids: Sequence[Sequence[int]] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
) -> QuantDescription:
    """Quantize the float model in ``src_dir`` into ``out_dir`` (msModelSlim layout).

    Args:
        recipe: a :class:`QuantRecipe`, or an algorithm ID string (= ``QuantRecipe(ID)``).
        activations: calibration inputs ``{module prefix: [tokens, K] array}`` for W8A8 /
            W8A8_MIX layers; for experts either per projection (``<experts>.<e>.<proj>``) or
            the block input (``<...>.experts``).
        calibration_token_ids: if given (and ``activations`` is None), the float model is run on
            these sequences to collect the activations (:func:`collect_activations`).

    Returns the written :class:`QuantDescription`. Tensor order: the source order, each
    quantized module's tensors in the quantizer's order followed by its FLOAT bias.
    """
    if isinstance(recipe, str):
        recipe = QuantRecipe(recipe)
    config, float_tensors = load_float_model(src_dir)
    plan = plan_layers(float_tensors, recipe)
    needs_calib = any(a in (A.W8A8, A.W8A8_MIX) for _, a in plan.values())
    if needs_calib and activations is None and calibration_token_ids is not None:
        activations = collect_activations(src_dir, calibration_token_ids)
    deq_dtype = _source_deq_dtype(recipe, config)
    rng = None if recipe.flatquant_seed is None else np.random.default_rng(recipe.flatquant_seed)

    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, str] = {}
    groups: set[int] = set()
    done: set[str] = set()
    flat_cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for name, arr in float_tensors.items():
        if name in done:
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is None or prefix not in plan or plan[prefix][1] == FLOAT:
            tensors[name] = arr
            entries[name] = FLOAT
            done.add(name)
            continue
        kind, algo = plan[prefix]
        bias_name = f"{prefix}.bias"
        bias = float_tensors.get(bias_name)
        m = _EXPERT_RE.match(name)
        if m is not None:
            e, proj = int(m["e"]), m["proj"]

            def calib(m=m, e=e, proj=proj):
                return _expert_calibration(activations, m["experts"], e, proj, float_tensors)
        else:
            def calib(prefix=prefix):
                return _calibration(activations, prefix)
        factors = None
        if algo == A.W4A4_FLATQUANT_DYNAMIC:
            group = _input_group(prefix) if recipe.flatquant_shared else prefix
            if group not in flat_cache:
                flat_cache[group] = _flatquant_factors(prefix, np.asarray(arr).shape[1], config, rng)
            factors = flat_cache[group]
        out = _quantize_projection(algo, prefix, np.asarray(arr), None if bias is None else np.asarray(bias),
                                   calib, recipe, config, deq_dtype, rng, flatquant_factors=factors)
        if algo in (A.W8A16, A.W4A8_DYNAMIC, A.W4A16):
            g = _effective_group(algo, recipe)
            if g:
                groups.add(g)
        for suffix, t in out.items():
            tensors[f"{prefix}.{suffix}"] = t
            entries[f"{prefix}.{suffix}"] = algo
        done.add(name)
        if bias is not None:  # msModelSlim writes the float bias for every algorithm (W8A8: also folded)
            tensors[bias_name] = bias
            entries[bias_name] = FLOAT
            done.add(bias_name)
    if len(groups) > 1:
        raise ValueError(f"grouped layers use different group sizes {sorted(groups)}; the description's "
                         "top-level group_size holds one value")
    algos = [a for _, a in plan.values() if a != FLOAT]
    model_quant_type = recipe.algorithm if recipe.algorithm != FLOAT else (algos[0] if algos else FLOAT)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    return write_quantized_model(
        out_dir, tensors, entries, model_quant_type=model_quant_type, group_size=groups.pop() if groups else 0,
        source_dir=src_dir, overwrite=overwrite, **kwargs,
    )
