"""FlatQuant calibration: the Kronecker factors and the clip ratio of one W4A4_FLATQUANT_DYNAMIC
layer, computed from the layer's calibration inputs (what msModelSlim's FlatQuant processor
learns; facts §7).

Given the layer input ``X`` ``[T, K]`` (float32, from the float model) and the (fused) weight ``W``
``[N, K]``, find ``P_L`` ``[L, L]``, ``P_R`` ``[R, R]`` (``(L, R) = decompose_dim(K)`` or a given
split) and ``clip`` that minimise the output error of the quantized layer,

    ``loss = mean((X W^T - Q_a(P_L^T X P_R) Q_w(P_L^{-1} W P_R^{-T})^T)^2)``

where ``Q_a`` is the per-token int4 quantizer with clip (``npu_kronecker_quant``) and ``Q_w`` the
per-channel int4 weight quantizer (``max|w'| / 7``, codes in [-7, 7]; the one
:func:`reference.weight_quant.quantize_w4a4_flatquant` applies). Three stages:

1. **Initialization** (:func:`initial_factors`): each factor is ``diag(d) @ Q`` with ``Q`` a
   seeded random orthogonal matrix and ``d`` a Kronecker-structured SmoothQuant balancing: the
   per-channel smoothing exponents ``log s_k = a log max|x_k| - (1 - a) log max|w_k|`` (``k`` =
   ``(i, j)`` in the ``[L, R]`` view) are fitted by least squares with ``log s_L[i] + log s_R[j]``
   and ``d = 1 / s`` (activations divided, weights multiplied). The candidates ``a`` in
   ``{0 (rotation only), 0.25, 0.5, 0.75}`` and plain identity factors are scored with the exact
   loss (stage 3's numerics, at clips 1.0, 0.9, 0.8); the best one starts stage 2.
2. **Learning** (:func:`calibrate_layer`): ``P = O_1 diag(exp(u - mean u)) O_2`` per factor (the
   SVD parameterization FlatQuant uses; here ``O = O_0 expm(S - S^T)`` so the orthogonal parts
   stay exactly orthogonal and ``P^{-1} = O_2^T diag(exp(mean u - u)) O_1^T`` needs no matrix
   inverse; the mean is removed so ``P_L`` and ``P_R`` cannot trade an overall scale). Adam with a
   cosine learning rate minimises the fake-quantized loss above with straight-through rounding
   (``x + (round(x) - x).detach()``), the clip ratio learned as ``sigmoid(theta)`` as msModelSlim
   does; a token mini-batch is drawn (seeded) when ``T`` exceeds ``batch_tokens``. The
   condition number of each factor is kept at or below ``max_condition`` (``u`` is clamped).
3. **Clip search**: with the learned factors fixed and the exact numerics of the checkpoint path
   (factors rounded to the model dtype, ``X'`` rounded to float16, weight transform in float64,
   round-half-even), ``clip`` is chosen on a grid ``1.0, 0.98, ..., 0.60`` (the learned value
   included). The factor set is kept only if its exact loss beats the initialization's
   (learning never makes a layer worse than stage 1).

Everything is seeded (``seed``) and runs on the CPU in float32 (the exact evaluation in float64),
on one torch thread by default; the result depends only on the inputs, the seed and the torch
build (summation order).

A whole model (:func:`plan_flatquant_model`, used by ``ascend-quant quantize``): the shards of a
fused linear (q/k/v, gate/up) share one transform calibrated on their concatenated weight;
``o_proj`` takes msModelSlim's real form, a stored head-mixing ``left_trans`` ``[heads, heads]``
plus a learned per-head ``[head_dim, head_dim]`` factor folded offline into ``v_proj``.

What msModelSlim does differently (its FlatQuant processor, facts §7): it trains per decoder
layer on the layer's output error over many calibration samples, with optional learnable weight
clipping and a full-``K`` diagonal smoothing folded into the preceding norm/linear; we train per
linear (fused group) on its own output error, without weight clipping (our weight quantizer is
plain ``max/7``) and with the smoothing restricted to the Kronecker form ``diag(d_L) x diag(d_R)``
that lives inside the stored factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..reference.flatquant import decompose_dim
from ..reference.rounding import model_dtype, round_to_dtype

__all__ = [
    "CLIP_GRID",
    "FlatQuantCalibration",
    "FlatQuantLayerPlan",
    "FlatQuantOptions",
    "calibrate_layer",
    "exact_output_error",
    "flatquant_groups",
    "initial_factors",
    "plan_flatquant_model",
    "random_orthogonal",
    "smooth_exponents",
]

#: Clip ratios searched in stage 3 (1.0 down to 0.6 in steps of 0.02).
CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.02 * i, 2) for i in range(21))


@dataclass(frozen=True)
class FlatQuantOptions:
    """Knobs of :func:`calibrate_layer`.

    Attributes:
        steps: Adam steps of stage 2 (0: initialization and clip search only).
        lr: peak learning rate of the factor parameters (cosine decay to 0).
        clip_lr: learning rate of the clip logit.
        batch_tokens: tokens per step; more calibration tokens are sub-sampled per step (seeded).
        max_condition: bound on each factor's condition number (``exp(u)`` spread).
        alphas: SmoothQuant migration strengths tried by the initialization (0 = rotation only).
        init_clips: clip ratios each initialization candidate is scored with (its best counts).
        clip_grid: clip ratios of the final search.
        seed: seed of the random orthogonal starts and of the token sampling.
        threads: torch threads during the calibration (restored after); 1 by default: the
            matrices are small, several threads mostly spin (10x slower on a busy machine), and
            one thread makes the result independent of the core count. ``None``: leave torch's.
    """

    steps: int = 150
    lr: float = 1e-2
    clip_lr: float = 5e-2
    batch_tokens: int = 1024
    max_condition: float = 1e3
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    init_clips: tuple[float, ...] = (1.0, 0.9, 0.8)
    clip_grid: tuple[float, ...] = CLIP_GRID
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self):
        if self.steps < 0 or self.batch_tokens < 1 or not (self.lr > 0 and self.clip_lr > 0):
            raise ValueError(f"FlatQuantOptions: need steps >= 0, batch_tokens >= 1 and positive learning rates, "
                             f"got steps={self.steps}, batch_tokens={self.batch_tokens}, lr={self.lr}, "
                             f"clip_lr={self.clip_lr}")
        if not self.max_condition > 1:
            raise ValueError(f"FlatQuantOptions: max_condition must exceed 1, got {self.max_condition}")
        for label, grid in (("clip_grid", self.clip_grid), ("init_clips", self.init_clips)):
            if not grid or not all(0 < c <= 1 for c in grid):
                raise ValueError(f"FlatQuantOptions: {label} must be non-empty values in (0, 1], got {grid}")


@dataclass
class FlatQuantCalibration:
    """The result of :func:`calibrate_layer`.

    ``left_trans`` ``[L, L]`` and ``right_trans`` ``[R, R]`` are float32 and exactly representable
    in the model dtype (what vLLM Ascend casts them to at load), ``clip_ratio`` a float32 in
    (0, 1]. ``loss`` maps a stage name (``"none"``: W4A4 per-token without transform,
    ``"identity"``: identity factors, clip 1; ``"init"``; ``"learned"``; ``"final"``) to the exact
    relative output error ``mean(err^2) / mean(y^2)`` on the calibration tokens.
    """

    left_trans: np.ndarray
    right_trans: np.ndarray
    clip_ratio: np.float32
    loss: dict[str, float] = field(default_factory=dict)
    init: str = ""


# ---------------------------------------------------------------------------------------
# initialization
# ---------------------------------------------------------------------------------------

def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal ``[n, n]`` float64 matrix (QR of a Gaussian, signs fixed by
    ``diag(R) > 0``), from ``rng``."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def smooth_exponents(x_absmax: np.ndarray, w_absmax: np.ndarray, shape: tuple[int, int],
                     alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Kronecker SmoothQuant: ``(log s_L [L], log s_R [R])`` with ``log s_L[i] + log s_R[j]`` the
    least-squares fit of ``alpha * log max|x_k| - (1 - alpha) * log max|w_k|`` over
    ``k = i * R + j`` (row means, then column means of the residual; each factor's exponents
    have mean 0: the overall scale is irrelevant to per-token and per-channel quantization).

    Channels whose activation or weight maximum is 0 get the mean exponent (no smoothing).
    """
    left, right = shape
    xa = np.asarray(x_absmax, np.float64).reshape(left, right)
    wa = np.asarray(w_absmax, np.float64).reshape(left, right)
    ok = (xa > 0) & (wa > 0) & np.isfinite(xa) & np.isfinite(wa)
    t = np.zeros((left, right))
    t[ok] = alpha * np.log(xa[ok]) - (1.0 - alpha) * np.log(wa[ok])
    t[~ok] = t[ok].mean() if ok.any() else 0.0
    t -= t.mean()
    s_left = t.mean(axis=1)
    s_right = (t - s_left[:, None]).mean(axis=0)
    return s_left, s_right


# ---------------------------------------------------------------------------------------
# the loss, in torch
# ---------------------------------------------------------------------------------------

def _ste_round(v):
    # straight-through estimator: forward rounds half to even (torch.round), backward is identity
    return v + (v.round() - v).detach()


def _fake_quant_output(x, w, pl, pr, pl_inv, pr_inv, clip):
    """float32 fake quantization (training): ``Q_a(P_L^T X P_R) @ Q_w(P_L^{-1} W P_R^{-T})^T``."""
    import torch

    t, k = x.shape
    n = w.shape[0]
    left, right = pl.shape[0], pr.shape[0]
    xt = torch.matmul(pl.T, torch.matmul(x.reshape(t, left, right), pr)).reshape(t, k)
    m = xt.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    s = m * clip / 7.0
    xq = torch.clamp(_ste_round(xt / s), -8.0, 7.0) * s
    wt = torch.matmul(pl_inv, torch.matmul(w.reshape(n, left, right), pr_inv.T)).reshape(n, k)
    sw = wt.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7.0
    wq = torch.clamp(_ste_round(wt / sw), -7.0, 7.0) * sw
    return xq @ wq.T


def exact_output_error(x: np.ndarray, w: np.ndarray, left_trans: np.ndarray | None,
                       right_trans: np.ndarray | None, clip_ratio: float | np.ndarray, dtype="float32",
                       y: np.ndarray | None = None) -> np.ndarray | float:
    """Relative output error ``mean((y - y_q)^2) / mean(y^2)`` of the quantized layer with the
    checkpoint path's numerics, ``y = X W^T`` (float64) unless given.

    ``left_trans is None``: W4A4_DYNAMIC (per-token int4 ``max/7`` of ``X``, codes [-7, 7], no
    transform). Otherwise FlatQuant: the factors rounded to ``dtype`` (as vLLM Ascend loads
    them), ``X' = f16(P_L^T X P_R)`` (``right_trans`` None: ``X`` viewed ``[L, K/L]``, left
    factor only), per-token int4 with clip (codes [-8, 7]); weight ``W' = P_L^{-1} W P_R^{-T}``
    (float64 of the float32 factors, as :func:`reference.weight_quant.quantize_w4a4_flatquant`),
    rounded to float32, per-channel int4 ``max/7``. Rounding is half to even throughout.
    ``clip_ratio`` may be a 1-D array: the errors of every clip are returned (one transform).

    The integer/scale arithmetic is float64 fake quantization, not the bit-exact reference
    forward; it differs from :func:`reference.linear.linear_forward` only by the float32
    roundings of scales and the final model-dtype rounding (relative ~1e-7 / 2^-8 of ``y``).
    """
    dt = model_dtype(dtype)
    x64 = np.asarray(x, np.float64)
    w64 = np.asarray(w, np.float64)
    t, k = x64.shape
    n = w64.shape[0]
    if y is None:
        y = x64 @ w64.T
    denom = float(np.mean(y * y)) or 1.0
    if left_trans is None:
        xt = x64
        clips = np.array([1.0])
        lo = -7.0
        wt = w64
    else:
        lt = np.asarray(left_trans, np.float32)
        rt = None if right_trans is None else np.asarray(right_trans, np.float32)
        left = lt.shape[0]
        right = k // left
        lt_on = round_to_dtype(lt, dt).astype(np.float64)
        xv = x64.reshape(t, left, right)
        if rt is not None:
            xv = xv @ round_to_dtype(rt, dt).astype(np.float64)
        xt = np.einsum("ji,tjr->tir", lt_on, xv).reshape(t, k).astype(np.float16).astype(np.float64)
        wv = np.einsum("ij,njr->nir", np.linalg.inv(lt.astype(np.float64)), w64.reshape(n, left, right))
        if rt is not None:
            wv = wv @ np.linalg.inv(rt.astype(np.float64)).T
        wt = wv.reshape(n, k).astype(np.float32).astype(np.float64)
        clips = np.atleast_1d(np.asarray(clip_ratio, np.float64))
        lo = -8.0
    sw = np.abs(wt).max(axis=1, keepdims=True) / 7.0
    sw[sw == 0] = 1.0
    wq = np.clip(np.rint(wt / sw), -7, 7) * sw
    m = np.abs(xt).max(axis=1, keepdims=True)
    m[m == 0] = 1.0
    wq32 = wq.astype(np.float32).T
    y32 = np.asarray(y, np.float32)
    errs = []
    for c in clips:
        s = m * c / 7.0
        xq = np.clip(np.rint(xt / s), lo, 7) * s
        # the product in float32: relative error ~1e-6 of y, far below the int4 error measured
        e = (xq.astype(np.float32) @ wq32 - y32).astype(np.float64)
        errs.append(float(np.mean(e * e)) / denom)
    if left_trans is not None and np.ndim(clip_ratio) > 0:
        return np.array(errs)
    return errs[0]


# ---------------------------------------------------------------------------------------
# the factor parameterization
# ---------------------------------------------------------------------------------------

class _Factor:
    """``P = O_1 diag(exp(u - mean u)) O_2``, ``O_i = O_i0 expm(S_i - S_i^T)``; ``P^{-1}`` explicit."""

    def __init__(self, o2_init: np.ndarray, log_d: np.ndarray, max_log_spread: float, fixed: bool = False):
        import torch

        n = o2_init.shape[0]
        self.fixed = fixed
        self.o2_0 = torch.tensor(o2_init, dtype=torch.float32)
        self.s1 = torch.zeros(n, n, requires_grad=not fixed)
        self.s2 = torch.zeros(n, n, requires_grad=not fixed)
        self.u = torch.tensor(log_d, dtype=torch.float32, requires_grad=not fixed)
        self.half_spread = max_log_spread / 2.0

    def params(self):
        return [] if self.fixed else [self.s1, self.s2, self.u]

    def matrices(self):
        import torch

        o1 = torch.linalg.matrix_exp(self.s1 - self.s1.T)
        o2 = self.o2_0 @ torch.linalg.matrix_exp(self.s2 - self.s2.T)
        u = self.u - self.u.mean()
        u = torch.clamp(u, -self.half_spread, self.half_spread)
        d = torch.exp(u)
        p = (o1 * d[None, :]) @ o2
        p_inv = (o2.T * (1.0 / d)[None, :]) @ o1.T
        return p, p_inv


def _to_model_dtype_f32(p: np.ndarray, dtype) -> np.ndarray:
    return round_to_dtype(np.asarray(p, np.float32), model_dtype(dtype)).astype(np.float32)


def initial_factors(x: np.ndarray, w: np.ndarray, shape: tuple[int, int], alpha: float | None,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stage-1 factors for one candidate: ``(O_L, log d_L, O_R, log d_R)`` with ``P = diag(d) O``.

    ``alpha is None``: identity factors. Otherwise ``O`` is a seeded random orthogonal matrix
    (:func:`random_orthogonal`, left first) and ``d = exp(-log s)`` with ``log s`` from
    :func:`smooth_exponents` (``alpha = 0`` skips the smoothing: a rotation only).
    """
    left, right = shape
    if alpha is None:
        return np.eye(left), np.zeros(left), np.eye(right), np.zeros(right)
    o_left, o_right = random_orthogonal(left, rng), random_orthogonal(right, rng)
    if alpha == 0:
        return o_left, np.zeros(left), o_right, np.zeros(right)
    xa = np.abs(np.asarray(x, np.float64)).max(axis=0)
    wa = np.abs(np.asarray(w, np.float64)).max(axis=0)
    s_left, s_right = smooth_exponents(xa, wa, shape, alpha)
    return o_left, -s_left, o_right, -s_right


def _dense(o: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    return np.exp(log_d)[:, None] * o


def calibrate_layer(x: np.ndarray, w: np.ndarray, *, shape: tuple[int, int] | None = None,
                    learn_right: bool = True, dtype="float32", options: FlatQuantOptions | None = None,
                    name: str = "layer") -> FlatQuantCalibration:
    """Calibrate one FlatQuant layer: ``x`` ``[T, K]`` calibration inputs (float), ``w`` ``[N, K]``
    the (fused) float weight; ``shape = (L, R)`` the token view (default ``decompose_dim(K)``);
    ``learn_right=False`` keeps ``P_R`` the identity (the o_proj form without a foldable right
    factor); ``dtype`` the model dtype (the factors are rounded to it before the clip search and
    returned so, stored as float32). See the module docstring for the three stages.

    Raises ``ValueError`` naming ``name`` for mismatched shapes or non-finite inputs.
    """
    import torch

    opts = options or FlatQuantOptions()
    before = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(int(opts.threads))
    try:
        return _calibrate_layer(x, w, shape, learn_right, dtype, opts, name)
    finally:
        torch.set_num_threads(before)


def _calibrate_layer(x, w, shape, learn_right, dtype, opts: FlatQuantOptions, name: str) -> FlatQuantCalibration:
    import torch

    x = np.asarray(x, dtype=np.float32)
    w = np.asarray(w, dtype=np.float32)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{name}: expected activations [T, K] and weight [N, K] with the same K, "
                         f"got {x.shape} and {w.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no calibration tokens")
    if not (np.isfinite(x).all() and np.isfinite(w).all()):
        raise ValueError(f"{name}: calibration activations or weight contain NaN/inf")
    t, k = x.shape
    left, right = shape if shape is not None else decompose_dim(k)
    if left * right != k:
        raise ValueError(f"{name}: token view {left} x {right} does not give K={k}")
    dt = model_dtype(dtype)
    x = round_to_dtype(x, dt).astype(np.float32)  # the layer sees model-dtype activations
    y64 = x.astype(np.float64) @ w.astype(np.float64).T
    result_loss: dict[str, float] = {
        "none": exact_output_error(x, w, None, None, 1.0, dt, y=y64),
        "identity": exact_output_error(x, w, np.eye(left, dtype=np.float32), np.eye(right, dtype=np.float32),
                                       1.0, dt, y=y64),
    }

    # stage 1: pick the best start among identity, rotation, smoothing + rotation
    best = None
    for alpha in (None, *opts.alphas):
        rng = np.random.default_rng(opts.seed)  # every candidate gets the same rotations
        o_l, d_l, o_r, d_r = initial_factors(x, w, (left, right), alpha, rng)
        if not learn_right:
            o_r, d_r = np.eye(right), np.zeros(right)
        half = math.log(opts.max_condition) / 2  # the condition bound holds from the start
        d_l, d_r = np.clip(d_l, -half, half), np.clip(d_r, -half, half)
        pl = _to_model_dtype_f32(_dense(o_l, d_l), dt)
        pr = _to_model_dtype_f32(_dense(o_r, d_r), dt)
        errs = exact_output_error(x, w, pl, pr, np.asarray(opts.init_clips), dt, y=y64)
        i = int(np.argmin(errs))
        if best is None or errs[i] < best[0]:
            best = (float(errs[i]), alpha, (o_l, d_l, o_r, d_r), opts.init_clips[i], pl, pr)
    init_err, init_alpha, (o_l, d_l, o_r, d_r), init_clip, init_pl, init_pr = best
    result_loss["init"] = init_err
    init_name = "identity" if init_alpha is None else ("rotation" if init_alpha == 0 else
                                                       f"smooth(alpha={init_alpha})+rotation")
    chosen = (init_pl, init_pr, np.float32(init_clip))
    result_loss["learned"] = init_err
    if opts.steps > 0:
        # stage 2: learn P_L, P_R and the clip (sigmoid) on the fake-quantized output error;
        # O_1 = I and O_2 = O_0 at step 0, so P starts at the stage-1 diag(d) O_0
        torch.manual_seed(opts.seed)
        spread = math.log(opts.max_condition)
        fl = _Factor(o_l, d_l, spread)
        fr = _Factor(o_r, d_r, spread, fixed=not learn_right)
        c0 = min(max(float(init_clip), 0.55), 0.995)
        theta = torch.tensor(math.log(c0 / (1.0 - c0)), requires_grad=True)
        opt = torch.optim.Adam([{"params": fl.params() + fr.params(), "lr": opts.lr},
                                {"params": [theta], "lr": opts.clip_lr}])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=opts.steps)
        xt_all = torch.from_numpy(x)
        wt = torch.from_numpy(w)
        y_all = torch.from_numpy(y64.astype(np.float32))
        scale = float(torch.mean(y_all * y_all)) or 1.0
        gen = torch.Generator().manual_seed(opts.seed)
        for _ in range(opts.steps):
            if t > opts.batch_tokens:
                idx = torch.randperm(t, generator=gen)[: opts.batch_tokens]
                xb, yb = xt_all[idx], y_all[idx]
            else:
                xb, yb = xt_all, y_all
            pl, pl_inv = fl.matrices()
            pr, pr_inv = fr.matrices()
            yq = _fake_quant_output(xb, wt, pl, pr, pl_inv, pr_inv, torch.sigmoid(theta))
            loss = torch.mean((yq - yb) ** 2) / scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            pl = _to_model_dtype_f32(fl.matrices()[0].numpy(), dt)
            pr = _to_model_dtype_f32(fr.matrices()[0].numpy(), dt)
            learned_clip = float(torch.sigmoid(theta))
        # stage 3: exact clip search for the learned factors
        grid = np.array(sorted(set(opts.clip_grid) | {round(learned_clip, 4)}, reverse=True))
        errs = exact_output_error(x, w, pl, pr, grid, dt, y=y64)
        i = int(np.argmin(errs))
        result_loss["learned"] = float(errs[i])
        if errs[i] < init_err:
            chosen = (pl, pr, np.float32(grid[i]))
    pl, pr, clip = chosen
    result_loss["final"] = min(result_loss["learned"], init_err)
    return FlatQuantCalibration(left_trans=pl, right_trans=pr, clip_ratio=np.float32(clip),
                                loss=result_loss, init=init_name)


# ---------------------------------------------------------------------------------------
# a whole model: fused groups, the o_proj form, folding into v_proj
# ---------------------------------------------------------------------------------------

#: Shards that vLLM runs as one fused linear with one activation transform (facts §9.13).
_FUSED_SHARDS: dict[str, str] = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


@dataclass
class FlatQuantLayerPlan:
    """What :func:`reference.weight_quant.quantize_w4a4_flatquant` gets for one projection:
    ``quantize_w4a4_flatquant(weight, left_trans, right_trans, clip_ratio)``.

    ``weight`` is the float32 weight to quantize: the source weight, except for ``v_proj`` when
    its ``o_proj``'s per-head factor was folded into it (rows ``P^T W_v`` per KV head) and for
    ``o_proj`` in that case (``W_o P^{-T}`` per head; only ``left_trans`` is stored, the o_proj
    form). ``bias`` is the (float32) replacement of the layer's bias when folding changed it, else
    ``None`` (keep the source bias). ``group`` names the fused group whose transform it shares.
    """

    left_trans: np.ndarray
    right_trans: np.ndarray | None
    clip_ratio: np.float32
    weight: np.ndarray
    bias: np.ndarray | None
    group: str
    calibration: FlatQuantCalibration


def flatquant_groups(prefixes) -> dict[str, list[str]]:
    """``{group key: [module prefixes]}``: the shards of one fused linear (``<parent>.qkv_proj``,
    ``<parent>.gate_up_proj``) share a group, every other projection is its own group."""
    groups: dict[str, list[str]] = {}
    for prefix in prefixes:
        parent, _, proj = prefix.rpartition(".")
        key = f"{parent}.{_FUSED_SHARDS[proj]}" if proj in _FUSED_SHARDS else prefix
        groups.setdefault(key, []).append(prefix)
    return groups


def _group_seed(key: str, seed: int) -> int:
    import zlib

    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def _o_proj_heads(prefix: str, k: int, config) -> int:
    text = config.get("text_config") or config
    heads = int(text.get("num_attention_heads", 0) or 0)
    if heads <= 0 or k % heads:
        raise ValueError(f"{prefix}: FlatQuant o_proj needs K={k} divisible by num_attention_heads={heads}")
    return heads


def plan_flatquant_model(weights, prefixes, config, inputs, *, biases=None, dtype="float32",
                         options: FlatQuantOptions | None = None, seed: int = 0,
                         step=None) -> dict[str, FlatQuantLayerPlan]:
    """Calibrate every W4A4_FLATQUANT_DYNAMIC projection of a model.

    Args:
        weights: ``{prefix: float weight [N, K]}`` for every prefix in ``prefixes`` (and the
            sibling ``v_proj`` of each ``o_proj``, when it is in ``prefixes``).
        prefixes: the module prefixes quantized with W4A4_FLATQUANT_DYNAMIC.
        config: the model's ``config.json`` (``num_attention_heads`` for o_proj).
        inputs: ``{prefix: calibration input [T, K]}`` for at least one prefix of every group
            of :func:`flatquant_groups` (the shards of a fused linear see the same input).
        biases: ``{prefix: float bias}`` (v_proj biases are folded with the weight).
        dtype: the model dtype of the output checkpoint.
        seed: mixed with each group's name into ``options.seed`` (deterministic per group).
        step: called with each group's key after it is calibrated (progress).

    The fused shards get one transform, calibrated on the concatenated weight (q/k/v, gate/up:
    their common input). ``o_proj`` follows msModelSlim's real output: its token is viewed
    ``[num_heads, head_dim]``, a head-mixing ``left_trans`` ``[heads, heads]`` is stored and a
    per-head factor ``P`` ``[head_dim, head_dim]`` is learned with it and folded offline into
    ``v_proj`` (attention is linear in V: each head's output becomes ``O_h P``), so no
    ``right_trans`` is stored. The fold needs a ``v_proj`` sibling quantized with FlatQuant too
    (its rows ``P^T W_v``, bias ``b P``, before the q/k/v transform is calibrated); without one,
    ``P`` is the identity and only ``left_trans`` is learned.
    """
    opts = options or FlatQuantOptions()
    biases = biases or {}
    prefixes = list(prefixes)
    groups = flatquant_groups(prefixes)
    weights = {p: np.asarray(weights[p], dtype=np.float32) for p in prefixes}
    bias_now: dict[str, np.ndarray] = {}
    out: dict[str, FlatQuantLayerPlan] = {}

    def group_input(key: str, members: list[str]) -> np.ndarray:
        for p in members:
            if p in inputs:
                return np.asarray(inputs[p], dtype=np.float32)
        raise ValueError(f"{key}: no calibration input for any of {members}")

    def options_for(key: str) -> FlatQuantOptions:
        from dataclasses import replace

        return replace(opts, seed=_group_seed(key, seed))

    # o_proj first: its per-head factor changes v_proj's weight before q/k/v are calibrated
    o_keys = [k for k, m in groups.items() if len(m) == 1 and m[0].rpartition(".")[2] == "o_proj"]
    for key in o_keys + [k for k in groups if k not in o_keys]:
        members = groups[key]
        x = group_input(key, members)
        if key in o_keys:
            prefix = members[0]
            w = weights[prefix]
            heads = _o_proj_heads(prefix, w.shape[1], config)
            head_dim = w.shape[1] // heads
            v_prefix = prefix.rpartition(".")[0] + ".v_proj"
            fold = v_prefix in weights and weights[v_prefix].shape[0] % head_dim == 0
            cal = calibrate_layer(x, w, shape=(heads, head_dim), learn_right=fold, dtype=dtype,
                                  options=options_for(key), name=prefix)
            if fold:
                p = cal.right_trans.astype(np.float64)
                wv = weights[v_prefix].astype(np.float64)
                kv = wv.shape[0] // head_dim
                # v rows of KV head g: W_g [head_dim, H] -> P^T W_g, so that V_g -> V_g P
                weights[v_prefix] = np.einsum("dk,gdh->gkh", p, wv.reshape(kv, head_dim, -1)
                                              ).reshape(wv.shape).astype(np.float32)
                if biases.get(v_prefix) is not None:
                    bv = np.asarray(biases[v_prefix], np.float64).reshape(kv, head_dim)
                    bias_now[v_prefix] = (bv @ p).reshape(-1).astype(np.float32)
                w_pre = (w.astype(np.float64).reshape(w.shape[0], heads, head_dim)
                         @ np.linalg.inv(p).T).reshape(w.shape).astype(np.float32)
            else:
                w_pre = w
            out[prefix] = FlatQuantLayerPlan(cal.left_trans, None, cal.clip_ratio, w_pre, None, key, cal)
        else:
            w = np.concatenate([weights[p] for p in members], axis=0)
            cal = calibrate_layer(x, w, dtype=dtype, options=options_for(key), name=key)
            for p in members:
                out[p] = FlatQuantLayerPlan(cal.left_trans, cal.right_trans, cal.clip_ratio, weights[p],
                                            bias_now.get(p), key, cal)
        if step is not None:
            step(key)
    return out
