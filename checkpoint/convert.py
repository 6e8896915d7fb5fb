"""The job behind ``ascend-quant quantize``: float HF safetensors directory -> quantized directory.

Built on :mod:`checkpoint.quantize_model` (layer planning, the per-projection quantizers, the float
model reader) and :mod:`checkpoint.io` (the msModelSlim-layout writer); what it adds:

* ``skip`` globs keep matching layers FLOAT (``fnmatch`` on the module prefix; MoE experts match by
  ``<...>.experts``), and a glob that matches nothing is reported;
* FlatQuant factors are shared by the shards of one fused layer (q/k/v, gate/up): vLLM runs them
  as one linear with one activation transform (facts §9.13), so every shard must carry the same
  ``left_trans``/``right_trans`` (:mod:`checkpoint.validate` rejects anything else);
* streaming calibration for the static-activation algorithms (W8A8, W8A8_MIX): the float model
  runs once over the calibration text and only a running min/max per layer input is kept (the
  statistic is msModelSlim's ``ActPerTensorMinmax`` with max aggregation, see
  :func:`reference.weight_quant.calibrate_input_scale_offset`); MoE blocks keep their full input
  (the per-expert down_proj input is derived from it);
* calibrated FlatQuant (W4A4_FLATQUANT_DYNAMIC, the default): the same pass keeps the full input
  of one projection per transform group, and :func:`checkpoint.flatquant_calibration.plan_flatquant_model`
  learns each group's Kronecker factors and clip ratio from it (o_proj: msModelSlim's
  ``[heads, heads]`` form, its per-head factor folded into v_proj); ``flatquant="random"`` keeps
  the earlier seeded random orthogonal factors with clip 1 (not calibrated; layout tests);
* the model dtype (``dtype``): FLOAT tensors are stored in it (RNE) and it decides the W8A8
  ``deq_scale`` storage like msModelSlim (int64 for float16/float32, float32 for bfloat16);
* progress reporting, and a final :func:`checkpoint.validate.validate_checkpoint` of the output.

The source directory is only read (memory maps opened read-only; transformers only reads it).
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from ..reference import algorithms as A
from ..reference import weight_quant as wq
from ..reference.rounding import model_dtype, round_to_dtype
from .description import FLOAT, PACKED_MODULES_MODEL_MAPPING, QuantDescription
from .calibration_forward import observe_module_inputs
from .io import write_quantized_model
from .quantize_model import (
    _EXPERT_RE,
    QuantRecipe,
    _effective_group,
    _expert_calibration,
    _quantize_projection,
    load_float_model,
    plan_layers,
)

__all__ = [
    "BUILTIN_CALIBRATION_TEXT",
    "calibration_token_ids",
    "collect_input_ranges",
    "quantize_directory",
]

#: Default calibration text (no download): English prose and Python code, the two kinds of text
#: the embedded model and typical chat models see. ~2 KB, i.e. a few hundred tokens.
BUILTIN_CALIBRATION_TEXT = '''\
The quick brown fox jumps over the lazy dog. Quantization maps real numbers onto a small set of
integers: a scale says how large one step is, and an offset says where zero lies. Static
activation quantization fixes both before the model runs, from statistics gathered on a few
sentences of calibration text; dynamic quantization measures every token as it comes.
In 1869 the Suez Canal opened, shortening the voyage between Europe and Asia by thousands of
kilometres. Rivers, mountains and cities appear in many languages; numbers such as 3.14159,
2.71828, 42, -17 and 1e-5 appear in tables, prices and measurements.

def mean_and_variance(values):
    """Return the mean and the population variance of a sequence of numbers."""
    n = len(values)
    if n == 0:
        raise ValueError("values: expected at least one number")
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / n
    return mean, variance


class Counter(dict):
    def add(self, key, count=1):
        self[key] = self.get(key, 0) + count
        return self[key]

for i, word in enumerate(["alpha", "beta", "gamma"]):
    print(f"{i}: {word.upper()} has {len(word)} letters")

Questions and answers: What is the capital of France? Paris. How many days are in a leap
year? 366. Translate "good morning" into Spanish: buenos días.
'''

_FUSED_OF: dict[str, str] = {}
for _mapping in PACKED_MODULES_MODEL_MAPPING.values():
    for _fused, _shards in _mapping.items():
        for _shard in _shards:
            if "." not in _shard:
                _FUSED_OF.setdefault(_shard, _fused)


def _progress(total: int, enabled: bool | None, desc: str):
    """A callable ``step(label)``: tqdm on a terminal, a plain line every ~10 % otherwise."""
    if enabled is False:
        return lambda label: None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=desc, unit="layer", file=sys.stderr)

            def step(label: str) -> None:
                bar.set_postfix_str(label[-40:], refresh=False)
                bar.update(1)
                if bar.n >= total:
                    bar.close()

            return step
        except ImportError:
            pass
    every = max(1, total // 10)
    count = [0]

    def plain(label: str) -> None:
        count[0] += 1
        if count[0] % every == 0 or count[0] == total:
            print(f"[{desc}] {count[0]}/{total} {label}", file=sys.stderr, flush=True)

    return plain


# ---------------------------------------------------------------------------------------
# calibration
# ---------------------------------------------------------------------------------------

def calibration_token_ids(src_dir: str, text: str, samples: int, seq_len: int, vocab_size: int,
                          seed: int = 0) -> tuple[list[list[int]], str]:
    """Up to ``samples`` windows of ``seq_len`` tokens of ``text`` (consecutive, no overlap),
    tokenized with the tokenizer in ``src_dir``; returns ``(token id lists, how)``.

    A directory without a tokenizer gets ``samples`` seeded uniformly random sequences instead
    (only meaningful for random test models); ``how`` says which was used.
    """
    if samples <= 0 or seq_len <= 1:
        raise ValueError(f"calibration: need samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    tok = None
    files = set(os.listdir(src_dir))
    if files & {"tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"}:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src_dir)
    if tok is None:
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, vocab_size, size=(samples, seq_len)).tolist()
        return ids, f"{samples} seeded random sequences of {seq_len} tokens (no tokenizer in {src_dir})"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError("calibration text: fewer than 2 tokens")
    windows = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)][:samples]
    windows = [w for w in windows if len(w) >= 2]
    return windows, f"{len(windows)} window(s), {sum(map(len, windows))} tokens of calibration text"


def collect_input_ranges(src_dir: str, token_ids: Sequence[Sequence[int]], linear_prefixes: Sequence[str],
                         experts_prefixes: Sequence[str] = (), full_prefixes: Sequence[str] = ()
                         ) -> dict[str, np.ndarray]:
    """Run the float model (float32) on ``token_ids`` and return, per module prefix, the
    calibration data :func:`reference.weight_quant.calibrate_input_scale_offset` needs:
    ``[min, max]`` (float32, over every value of every token) of each linear layer's input in
    ``linear_prefixes``, and the full input ``[tokens, H]`` of each MoE ``experts`` module in
    ``experts_prefixes`` (its down_proj inputs are derived per expert). min/max is all the
    per-tensor min/max statistic uses, so keeping only it gives identical parameters.
    ``full_prefixes``: modules whose full input ``[tokens, K]`` (float32) is returned too
    (FlatQuant calibration); a prefix must not be in both lists."""
    ranges: dict[str, list[float]] = {}
    full: dict[str, list[np.ndarray]] = {}
    wanted_lin, wanted_exp = set(linear_prefixes), set(experts_prefixes) | set(full_prefixes)
    if wanted_lin & wanted_exp:
        raise ValueError(f"calibration: {sorted(wanted_lin & wanted_exp)[:3]} asked for both ranges and full inputs")

    def observe(name: str, x: np.ndarray) -> None:
        if name in wanted_exp:
            full.setdefault(name, []).append(x)
            return
        lo, hi = float(x.min()), float(x.max())
        r = ranges.setdefault(name, [lo, hi])
        r[0], r[1] = min(r[0], lo), max(r[1], hi)

    observe_module_inputs(src_dir, token_ids, lambda name, _: name in wanted_lin or name in wanted_exp, observe)
    missing = sorted((wanted_lin - set(ranges)) | (wanted_exp - set(full)))
    if missing:
        raise ValueError(f"calibration: the float model never ran module(s) {missing[:3]} "
                         "(not reached by the forward pass?)")
    out = {k: np.array(v, dtype=np.float32) for k, v in ranges.items()}
    out.update({k: np.concatenate(v, axis=0) for k, v in full.items()})
    return out


# ---------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------

def _check_dirs(src_dir: str, out_dir: str, overwrite: bool) -> None:
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"{src_dir}: source model directory does not exist")
    src, out = os.path.realpath(src_dir), os.path.realpath(out_dir)
    if src == out or out.startswith(src + os.sep) or src.startswith(out + os.sep):
        raise ValueError(f"{out_dir}: the output directory must not be, contain or lie inside the source "
                         f"directory {src_dir} (the source is never modified)")
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise FileExistsError(f"{out_dir}: exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise FileExistsError(f"{out_dir}: directory is not empty (pass --overwrite to replace its files)")


def _check_group_divides(plan, float_tensors, recipe: QuantRecipe) -> None:
    """Refuse a group size that does not divide a grouped layer's K up front (the validator,
    and so vLLM, rejects such checkpoints: a ragged last group is ambiguous in the format)."""
    for prefix, (_, algo) in plan.items():
        if algo not in (A.W8A16, A.W4A8_DYNAMIC, A.W4A16):
            continue
        g = _effective_group(algo, recipe)
        w = float_tensors.get(f"{prefix}.weight")
        if g and w is not None:
            k = int(np.shape(w)[-1])
            if k % g:
                raise ValueError(f"{prefix}.weight: group size {g} does not divide K = {k} "
                                 f"({algo}); choose a divisor of every grouped layer's K")


def _source_dtype(config: dict) -> str:
    text = config.get("text_config") or config
    dt = str(text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype") or config.get("dtype")
             or "float32")
    return dt.replace("torch.", "")


def _rng_for(prefix: str, seed: int) -> np.random.Generator:
    """FlatQuant factor generator of ``prefix``, identical for the shards of one fused layer."""
    parent, _, proj = prefix.rpartition(".")
    key = f"{parent}.{_FUSED_OF.get(proj, proj)}"
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def quantize_directory(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    algorithm: str,
    *,
    group_size: int | None = None,
    skip: Sequence[str] = (),
    calibration_text: str | None = None,
    calib_samples: int = 8,
    calib_seq_len: int = 256,
    dtype: str = "auto",
    overwrite: bool = False,
    flatquant_seed: int = 0,
    flatquant: str = "calibrated",
    flatquant_steps: int | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> QuantDescription:
    """Quantize the float model in ``src_dir`` into ``out_dir`` with ``algorithm`` (an ID of
    :data:`reference.algorithms.LINEAR_ALGORITHMS`); see the module docstring.

    Every linear layer gets ``algorithm`` except those matching a ``skip`` glob, ``lm_head``
    and the MoE router (FLOAT, as msModelSlim's default recipes); MoE experts get it when it is a
    MoE algorithm (:data:`reference.algorithms.MOE_ALGORITHMS`), else stay FLOAT.
    ``group_size``: per-group size for W8A16 / W4A8_DYNAMIC (two-step) / W4A16 (default: W4A16 32,
    others per channel). ``calibration_text`` (default :data:`BUILTIN_CALIBRATION_TEXT`) is cut
    into ``calib_samples`` windows of ``calib_seq_len`` tokens. ``dtype``: ``"auto"`` (the
    source's ``torch_dtype``), ``"float32"``, ``"float16"`` or ``"bfloat16"``.
    ``flatquant``: ``"calibrated"`` (learn each W4A4_FLATQUANT_DYNAMIC transform group's factors
    and clip ratio on the calibration text, :mod:`checkpoint.flatquant_calibration`, with
    ``flatquant_steps`` Adam steps, default
    :attr:`~checkpoint.flatquant_calibration.FlatQuantOptions.steps`; 0 = initialization and clip
    search only) or ``"random"`` (seeded random orthogonal factors, clip 1). ``flatquant_seed``
    seeds either.
    Raises ``FileExistsError`` for a non-empty ``out_dir`` without ``overwrite`` and
    ``ValueError`` naming the layer for a layer the algorithm cannot quantize.
    """
    src_dir, out_dir = os.fspath(src_dir), os.fspath(out_dir)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    A.check_algorithm(algorithm, "linear")
    _check_dirs(src_dir, out_dir, overwrite)
    config, float_tensors = load_float_model(src_dir)
    src_dt = _source_dtype(config)
    target = src_dt if dtype == "auto" else dtype
    target_dt = model_dtype(target)
    deq_dtype = "float32" if target_dt.name == "bfloat16" else "int64"
    recipe = QuantRecipe(algorithm, overrides=tuple((g, FLOAT) for g in skip), group_size=group_size,
                         deq_scale_dtype=deq_dtype, flatquant_seed=flatquant_seed)
    plan = plan_layers(float_tensors, recipe)
    _check_group_divides(plan, float_tensors, recipe)
    for g in skip:
        if not any(fnmatch.fnmatchcase(p, g) or fnmatch.fnmatchcase(p.rsplit(".", 2)[0], g) for p in plan):
            say(f"[quantize] warning: --skip {g!r} matched no layer")
    moe_experts = {m["experts"] for p in plan for m in [_EXPERT_RE.match(p + ".weight")] if m}
    if moe_experts and algorithm not in A.MOE_ALGORITHMS:
        say(f"[quantize] {algorithm} has no MoE implementation: MoE experts stay FLOAT "
            f"(MoE algorithms: {', '.join(A.MOE_ALGORITHMS)})")

    if flatquant not in ("calibrated", "random"):
        raise ValueError(f"flatquant: expected 'calibrated' or 'random', got {flatquant!r}")
    activations = None
    static = [p for p, (_, a) in plan.items() if a in (A.W8A8, A.W8A8_MIX)]
    flat = [p for p, (_, a) in plan.items() if a == A.W4A4_FLATQUANT_DYNAMIC] if flatquant == "calibrated" else []
    if static or flat:
        from .flatquant_calibration import flatquant_groups

        text = BUILTIN_CALIBRATION_TEXT if calibration_text is None else calibration_text
        vocab = int((config.get("text_config") or config).get("vocab_size", 2))
        ids, how = calibration_token_ids(src_dir, text, calib_samples, calib_seq_len, vocab)
        lin = [p for p in static if _EXPERT_RE.match(p + ".weight") is None]
        exp = sorted({m["experts"] for p in static for m in [_EXPERT_RE.match(p + ".weight")] if m})
        full = [members[0] for members in flatquant_groups(flat).values()]
        if static:
            say(f"[quantize] calibrating {len(static)} static-activation layer(s) on {how} "
                "(per-tensor min/max of each layer input)")
        if flat:
            say(f"[quantize] calibrating the FlatQuant transforms of {len(flat)} layer(s) on {how}")
        activations = collect_input_ranges(src_dir, ids, lin, exp, full)
    flat_plan = {}
    if flat:
        from .flatquant_calibration import FlatQuantOptions, plan_flatquant_model

        opts = FlatQuantOptions() if flatquant_steps is None else FlatQuantOptions(steps=int(flatquant_steps))
        n_groups = len(flatquant_groups(flat))
        flat_plan = plan_flatquant_model(
            {p: np.asarray(float_tensors[f"{p}.weight"]).astype(np.float32) for p in flat}, flat, config,
            activations, biases={p: np.asarray(float_tensors[f"{p}.bias"]).astype(np.float32)
                                 for p in flat if f"{p}.bias" in float_tensors},
            dtype=target_dt, options=opts, seed=flatquant_seed,
            step=_progress(n_groups, progress, "flatquant"))
        errs = {g.group: g.calibration.loss for g in flat_plan.values()}
        mean = {k: float(np.mean([e[k] for e in errs.values()])) for k in ("none", "final")}
        say(f"[quantize] FlatQuant calibration: mean relative output error over {len(errs)} transform "
            f"group(s) {mean['none']:.3g} without a transform -> {mean['final']:.3g}")

    work = [n for n in float_tensors if n.endswith(".weight") and n[: -len(".weight")] in plan
            and plan[n[: -len(".weight")]][1] != FLOAT]
    step = _progress(len(work), progress, "quantize")
    tensors: dict[str, np.ndarray] = {}
    entries: dict[str, str] = {}
    groups: set[int] = set()
    done: set[str] = set()
    for name, arr in float_tensors.items():
        if name in done:
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is None or prefix not in plan or plan[prefix][1] == FLOAT:
            a = np.asarray(arr)
            if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16":
                a = round_to_dtype(a, target_dt) if a.dtype != target_dt else a
            tensors[name] = a
            entries[name] = FLOAT
            done.add(name)
            continue
        algo = plan[prefix][1]
        bias_name = f"{prefix}.bias"
        bias = float_tensors.get(bias_name)
        m = _EXPERT_RE.match(name)
        if m is not None:
            def calib(m=m):
                return _expert_calibration(activations, m["experts"], int(m["e"]), m["proj"], float_tensors)
        else:
            def calib(prefix=prefix):
                return activations[prefix]
        if prefix in flat_plan:
            fp = flat_plan[prefix]
            out = wq.quantize_w4a4_flatquant(fp.weight, fp.left_trans, fp.right_trans, fp.clip_ratio,
                                             name=f"{prefix}.weight")
            if bias is not None and fp.bias is not None:
                bias = fp.bias  # v_proj: o_proj's per-head factor folded in
        else:
            out = _quantize_projection(algo, prefix, np.asarray(arr), None if bias is None else np.asarray(bias),
                                       calib, recipe, config, deq_dtype, _rng_for(prefix, flatquant_seed))
        if algo in (A.W8A16, A.W4A8_DYNAMIC, A.W4A16):
            g = _effective_group(algo, recipe)
            if g:
                groups.add(g)
        for suffix, t in out.items():
            tensors[f"{prefix}.{suffix}"] = t
            entries[f"{prefix}.{suffix}"] = algo
        done.add(name)
        if bias is not None:
            b = np.asarray(bias)
            tensors[bias_name] = round_to_dtype(b, target_dt) if b.dtype != target_dt else b
            entries[bias_name] = FLOAT
            done.add(bias_name)
        step(prefix)
    if len(groups) > 1:
        raise ValueError(f"grouped layers use different group sizes {sorted(groups)}")
    desc = write_quantized_model(out_dir, tensors, entries, model_quant_type=algorithm,
                                 group_size=groups.pop() if groups else 0, source_dir=src_dir,
                                 overwrite=overwrite)
    if dtype != "auto" and target_dt.name != src_dt:
        cfg_path = os.path.join(out_dir, "config.json")
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        for holder in (cfg, cfg.get("text_config")):
            if isinstance(holder, dict):
                for key in ("torch_dtype", "dtype"):
                    if key in holder or holder is cfg:
                        holder[key] = target_dt.name
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
            f.write("\n")
    from .validate import validate_checkpoint

    validate_checkpoint(out_dir, raise_errors=True)
    return desc
