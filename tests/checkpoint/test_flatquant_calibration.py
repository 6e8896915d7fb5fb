"""FlatQuant calibration (checkpoint/flatquant_calibration.py): the calibrated transform beats no
transform and identity factors on a layer with outlier channels, measured through the bit-exact
reference forward (an independent route from the calibration's own fake quantization); the
Kronecker smoothing fit, determinism, the model-dtype factors, and the o_proj -> v_proj fold."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ascend_quant.checkpoint.flatquant_calibration import (  # noqa: E402
    FlatQuantOptions,
    calibrate_layer,
    exact_output_error,
    flatquant_groups,
    plan_flatquant_model,
    smooth_exponents,
)
from ascend_quant.reference import weight_quant as wq  # noqa: E402
from ascend_quant.reference.linear import linear_forward  # noqa: E402
from ascend_quant.reference.rounding import model_dtype, round_to_dtype  # noqa: E402

FAST = FlatQuantOptions(steps=60)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _outlier_layer(seed: int, t: int = 256, k: int = 64, n: int = 48):
    """Gaussian activations with 3 outlier channels (x25), a Gaussian weight; calibration and test
    tokens come from the same distribution (same outlier channels)."""
    rng = np.random.default_rng(seed)
    outliers = rng.choice(k, 3, replace=False)

    def tokens(m):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, outliers] *= 25
        return x

    w = (rng.standard_normal((n, k)) / 8).astype(np.float32)
    return tokens(t), tokens(t), w


def _rel_err(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> float:
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    return float(np.mean((y.astype(np.float64) - ref) ** 2) / np.mean(ref * ref))


def _reference_errors(x, w, cal):
    """Relative output errors of W4A4_DYNAMIC, identity FlatQuant (clip 1) and the calibrated
    FlatQuant, each quantized and run by the reference (reference.weight_quant + linear)."""
    left, right = cal.left_trans.shape[0], cal.right_trans.shape[0]
    none = linear_forward("W4A4_DYNAMIC", x, wq.quantize_w4a4_dynamic(w), dtype="float32")
    ident = linear_forward("W4A4_FLATQUANT_DYNAMIC", x,
                           wq.quantize_w4a4_flatquant(w, np.eye(left), np.eye(right), 1.0), dtype="float32")
    calib = linear_forward("W4A4_FLATQUANT_DYNAMIC", x,
                           wq.quantize_w4a4_flatquant(w, cal.left_trans, cal.right_trans, cal.clip_ratio),
                           dtype="float32")
    return _rel_err(none, x, w), _rel_err(ident, x, w), _rel_err(calib, x, w)


@pytest.mark.parametrize("seed", [0, 1])
def test_calibrated_transform_beats_no_transform_and_identity(seed):
    x_cal, x_test, w = _outlier_layer(seed)
    cal = calibrate_layer(x_cal, w, options=FAST)
    assert cal.left_trans.shape == (8, 8) and cal.right_trans.shape == (8, 8)  # decompose_dim(64)
    assert 0.6 <= cal.clip_ratio <= 1.0
    for x in (x_cal, x_test):
        e_none, e_ident, e_cal = _reference_errors(x, w, cal)
        # measured ~0.04 / ~0.04 / ~0.005 (8x lower); a factor 3 leaves a wide margin
        assert e_cal < e_none / 3, (e_none, e_cal)
        assert e_cal < e_ident / 3, (e_ident, e_cal)
    # the stages never get worse: initialization beats identity, learning beats initialization
    assert cal.loss["init"] < cal.loss["identity"]
    assert cal.loss["final"] <= cal.loss["init"]
    assert cal.loss["final"] < 0.6 * cal.loss["init"]  # learning pays (measured ~0.4x)


def test_exact_output_error_matches_the_reference_forward():
    x, _, w = _outlier_layer(2)
    cal = calibrate_layer(x, w, options=FlatQuantOptions(steps=5))
    _, _, e_ref = _reference_errors(x, w, cal)
    e = exact_output_error(x, w, cal.left_trans, cal.right_trans, cal.clip_ratio, "float32")
    # same codes and scales; only float32 scale roundings and the f32 product differ (~1e-6 rel.)
    assert e == pytest.approx(e_ref, rel=1e-3)
    e_none = exact_output_error(x, w, None, None, 1.0, "float32")
    y = linear_forward("W4A4_DYNAMIC", x, wq.quantize_w4a4_dynamic(w), dtype="float32")
    assert e_none == pytest.approx(_rel_err(y, x, w), rel=1e-3)
    grid = exact_output_error(x, w, cal.left_trans, cal.right_trans, np.array([1.0, float(cal.clip_ratio)]))
    assert grid.shape == (2,) and grid[1] == pytest.approx(e, rel=1e-12)


def test_calibration_is_deterministic_and_factors_fit_the_model_dtype():
    x, _, w = _outlier_layer(3, t=64, k=48, n=16)  # K = 48 -> (L, R) = (6, 8)
    a = calibrate_layer(x, w, dtype="bfloat16", options=FlatQuantOptions(steps=20, seed=7))
    b = calibrate_layer(x, w, dtype="bfloat16", options=FlatQuantOptions(steps=20, seed=7))
    assert a.left_trans.shape == (6, 6) and a.right_trans.shape == (8, 8)
    for f, g in ((a.left_trans, b.left_trans), (a.right_trans, b.right_trans)):
        assert f.dtype == np.float32 and f.tobytes() == g.tobytes()
        # exactly representable in bf16: vLLM Ascend's cast at load changes nothing
        assert np.array_equal(round_to_dtype(f, model_dtype("bfloat16")).astype(np.float32), f)
        # the condition bound (max_condition 1e3), with room for the bf16 rounding of the factors
        assert np.linalg.cond(f.astype(np.float64)) < 1.05e3
    assert a.clip_ratio.tobytes() == b.clip_ratio.tobytes()


def test_smooth_exponents_recover_a_kronecker_structure():
    # max|x| = exp(p_i + q_j) and max|w| = exp(-(p_i + q_j)) exactly: log s = p_i + q_j for any
    # alpha, so the fit returns p - mean(p) and q - mean(q) (hand-checkable: no residual)
    p = np.array([0.0, 1.0, 3.0])
    q = np.array([2.0, -1.0, 0.5, 0.5])
    logs = p[:, None] + q[None, :]
    for alpha in (0.25, 0.5):
        s_left, s_right = smooth_exponents(np.exp(logs).reshape(-1), np.exp(-logs).reshape(-1), (3, 4), alpha)
        np.testing.assert_allclose(s_left, p - p.mean(), atol=1e-12)  # float64 logs of exp: ~1 ulp
        np.testing.assert_allclose(s_right, q - q.mean(), atol=1e-12)
    # a zero channel (never active) gets the mean exponent, not -inf
    xa = np.exp(logs).reshape(-1)
    xa[5] = 0.0
    s_left, s_right = smooth_exponents(xa, np.ones(12), (3, 4), 0.5)
    assert np.isfinite(s_left).all() and np.isfinite(s_right).all()


def test_learn_right_false_keeps_the_identity():
    x, _, w = _outlier_layer(4, t=64, k=32, n=16)
    cal = calibrate_layer(x, w, shape=(4, 8), learn_right=False, options=FlatQuantOptions(steps=10))
    assert np.array_equal(cal.right_trans, np.eye(8, dtype=np.float32))
    assert cal.left_trans.shape == (4, 4)


def test_options_are_validated():
    for bad in (dict(steps=-1), dict(batch_tokens=0), dict(lr=0.0), dict(max_condition=1.0),
                dict(clip_grid=(1.0, 0.0)), dict(init_clips=())):
        with pytest.raises(ValueError, match="FlatQuantOptions"):
            FlatQuantOptions(**bad)


@pytest.mark.parametrize("bad", ["shape", "nan", "empty", "view"])
def test_bad_input_is_a_value_error_naming_the_layer(bad):
    x, _, w = _outlier_layer(5, t=16, k=32, n=8)
    kwargs = {}
    if bad == "shape":
        w = w[:, :16]
    elif bad == "nan":
        x[3, 4] = np.nan
    elif bad == "empty":
        x = x[:0]
    else:
        kwargs["shape"] = (4, 4)
    with pytest.raises(ValueError, match="layers.0.mlp.down_proj"):
        calibrate_layer(x, w, name="layers.0.mlp.down_proj", options=FlatQuantOptions(steps=1), **kwargs)


def test_model_plan_shares_fused_transforms_and_folds_o_proj_into_v_proj():
    rng = np.random.default_rng(11)
    h, heads, kv, hd, inter = 32, 4, 2, 8, 48
    a = "model.layers.0.self_attn"
    m = "model.layers.0.mlp"
    shapes = {f"{a}.q_proj": (heads * hd, h), f"{a}.k_proj": (kv * hd, h), f"{a}.v_proj": (kv * hd, h),
              f"{a}.o_proj": (h, heads * hd), f"{m}.gate_proj": (inter, h), f"{m}.up_proj": (inter, h),
              f"{m}.down_proj": (h, inter)}
    weights = {p: rng.standard_normal(s).astype(np.float32) / 4 for p, s in shapes.items()}
    v_bias = rng.standard_normal(kv * hd).astype(np.float32)
    inputs = {p: rng.standard_normal((48, s[1])).astype(np.float32)
              for p, s in shapes.items() if p.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))}
    groups = flatquant_groups(shapes)
    assert groups[f"{a}.qkv_proj"] == [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"]
    assert groups[f"{m}.gate_up_proj"] == [f"{m}.gate_proj", f"{m}.up_proj"]
    plan = plan_flatquant_model(weights, list(shapes), {"num_attention_heads": heads}, inputs,
                                biases={f"{a}.v_proj": v_bias}, options=FlatQuantOptions(steps=5))
    for x, y in ((f"{a}.q_proj", f"{a}.v_proj"), (f"{a}.k_proj", f"{a}.v_proj"), (f"{m}.gate_proj", f"{m}.up_proj")):
        for key in ("left_trans", "right_trans", "clip_ratio"):
            assert np.asarray(getattr(plan[x], key)).tobytes() == np.asarray(getattr(plan[y], key)).tobytes()
    o = plan[f"{a}.o_proj"]
    assert o.left_trans.shape == (heads, heads) and o.right_trans is None  # msModelSlim's o_proj form
    # the fold keeps the float function: attention output O (per head a mix of V rows, here V
    # itself repeated for the GQA groups) through the folded v_proj and pre-transformed o_proj
    xin = rng.standard_normal((5, h))
    v_old = xin @ weights[f"{a}.v_proj"].astype(np.float64).T + v_bias
    v_new = xin @ plan[f"{a}.v_proj"].weight.astype(np.float64).T + plan[f"{a}.v_proj"].bias
    rep = np.repeat(np.arange(kv), heads // kv)  # q head -> kv head
    o_old = v_old.reshape(5, kv, hd)[:, rep].reshape(5, -1)
    o_new = v_new.reshape(5, kv, hd)[:, rep].reshape(5, -1)
    y_old = o_old @ weights[f"{a}.o_proj"].astype(np.float64).T
    y_new = o_new @ o.weight.astype(np.float64).T
    # float32 storage of the folded weights: relative error ~1e-6 of |y|
    np.testing.assert_allclose(y_new, y_old, rtol=0, atol=1e-4 * np.abs(y_old).max())
    assert not np.allclose(plan[f"{a}.v_proj"].weight, weights[f"{a}.v_proj"])  # something was folded
    # without a FlatQuant v_proj there is nothing to fold into: the o_proj weight is the source's
    solo = plan_flatquant_model({f"{a}.o_proj": weights[f"{a}.o_proj"]}, [f"{a}.o_proj"],
                                {"num_attention_heads": heads}, inputs, options=FlatQuantOptions(steps=2))
    assert np.array_equal(solo[f"{a}.o_proj"].weight, weights[f"{a}.o_proj"])
