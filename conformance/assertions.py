"""Assertion helpers of the conformance suite (the "ph" of array-api-tests).

* :func:`assert_bitexact`: same dtype, same shape, same bytes. Floats: NaN positions must
  match and NaN payloads are not compared (IEEE leaves them unspecified); +0.0 and -0.0
  differ.
* :func:`assert_within_ulp`: elementwise distance in units in the last place of the
  array's float dtype (float32, float16, bfloat16), counted on the ordered integer image
  of the bit patterns; NaN positions must match, infinities must be equal.
* :func:`assert_within_abs`: ``|actual - expected| <= bound`` elementwise (float64), for
  float stages whose bound is derived where it is used.
* :func:`repro`: a context manager that turns an ``AssertionError`` into one carrying a
  copy-pasteable reproduction (arrays inline when small, else saved to an ``.npz``).

Every helper is meta-tested (``test_meta.py``): it fails on a one-bit or one-ulp change.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

__all__ = ["assert_bitexact", "assert_within_ulp", "assert_within_abs", "ulp_distance", "ulp_of", "repro",
           "to_numpy", "REPRO_DIR"]

REPRO_DIR = Path(os.environ.get("ASCEND_QUANT_REPRO_DIR", Path(tempfile.gettempdir()) / "ascend_quant_repro"))

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SINT = {2: np.int16, 4: np.int32, 8: np.int64}
#: (significand bits incl. the implicit one, smallest normal exponent) per float dtype name
_FLOAT_FORMAT = {"float32": (24, -126), "float16": (11, -14), "bfloat16": (8, -126), "float64": (53, -1022)}


def to_numpy(a) -> np.ndarray:
    """numpy array from a numpy array or a torch tensor (bf16 -> ml_dtypes.bfloat16)."""
    if hasattr(a, "detach"):
        t = a.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import torch
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(a)


def _is_float(dt: np.dtype) -> bool:
    return dt.name in _FLOAT_FORMAT


def assert_bitexact(actual, expected, what: str = "value") -> None:
    """Assert same dtype, shape and bytes (floats: NaN positions equal, payload ignored)."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != expected {e.dtype}"
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    ua = np.ascontiguousarray(a).view(_UINT[a.dtype.itemsize])
    ue = np.ascontiguousarray(e).view(_UINT[e.dtype.itemsize])
    if _is_float(a.dtype):
        na = np.isnan(a.astype(np.float64))
        ne = np.isnan(e.astype(np.float64))
        if not np.array_equal(na, ne):
            i = np.argwhere(na != ne)[0]
            raise AssertionError(f"{what}: NaN positions differ, first at {tuple(i)}: "
                                 f"actual {a[tuple(i)]!r}, expected {e[tuple(i)]!r}")
        diff = (ua != ue) & ~na
    else:
        diff = ua != ue
    if diff.any():
        idx = np.argwhere(diff)
        i = tuple(idx[0])
        raise AssertionError(
            f"{what}: {len(idx)} of {a.size} elements differ bitwise; first at {i}: actual {a[i]!r} "
            f"(0x{int(ua[i]):0{2 * a.dtype.itemsize}x}), expected {e[i]!r} (0x{int(ue[i]):0{2 * a.dtype.itemsize}x})")


def _ordered(a: np.ndarray) -> np.ndarray:
    """Map float bit patterns to integers whose order and differences count ulps (-0 == +0)."""
    size = a.dtype.itemsize
    bits = np.ascontiguousarray(a).view(_SINT[size]).astype(np.int64)
    sign_mask = np.int64(1) << (8 * size - 1)
    mag = bits & (sign_mask - 1)
    return np.where(bits & sign_mask, -mag, mag)


def ulp_distance(actual, expected) -> np.ndarray:
    """Elementwise distance in ulps of the (common) float dtype, as int64 (NaN -> 0)."""
    a, e = to_numpy(actual), to_numpy(expected)
    if a.dtype != e.dtype or not _is_float(a.dtype):
        raise ValueError(f"ulp_distance needs two arrays of one float dtype, got {a.dtype} and {e.dtype}")
    d = np.abs(_ordered(a) - _ordered(e))
    both_nan = np.isnan(a.astype(np.float64)) & np.isnan(e.astype(np.float64))
    return np.where(both_nan, 0, d)


def assert_within_ulp(actual, expected, bound: int, what: str = "value", why: str = "") -> None:
    """Assert ``ulp_distance <= bound`` everywhere; NaN positions and infinities must match."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != expected {e.dtype}"
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    af, ef = a.astype(np.float64), e.astype(np.float64)
    if not np.array_equal(np.isnan(af), np.isnan(ef)):
        i = tuple(np.argwhere(np.isnan(af) != np.isnan(ef))[0])
        raise AssertionError(f"{what}: NaN positions differ, first at {i}: actual {a[i]!r}, expected {e[i]!r}")
    inf = np.isinf(af) | np.isinf(ef)
    if not np.array_equal(af[inf], ef[inf]):
        i = tuple(np.argwhere(inf & (af != ef))[0])
        raise AssertionError(f"{what}: infinities differ at {i}: actual {a[i]!r}, expected {e[i]!r}")
    d = np.where(inf, 0, ulp_distance(a, e))
    if (d > bound).any():
        i = tuple(np.argwhere(d > bound)[0])
        raise AssertionError(f"{what}: {int((d > bound).sum())} elements exceed {bound} ulp ({why}); worst "
                             f"{int(d.max())} ulp; first at {i}: actual {a[i]!r}, expected {e[i]!r}")


def ulp_of(v, dtype) -> np.ndarray:
    """Spacing of ``dtype`` (float32/float16/bfloat16) at magnitude ``|v|`` (float64 array).

    For normal magnitudes ``2^(floor(log2 |v|) - p + 1)``; below the normal range the
    subnormal spacing ``2^(emin - p + 1)``; for inf/NaN the largest finite spacing.
    """
    p, emin = _FLOAT_FORMAT[np.dtype(dtype).name]
    v = np.abs(np.asarray(v, dtype=np.float64))
    finite = np.isfinite(v)
    e = np.floor(np.log2(np.where(finite & (v > 0), v, 1.0)))
    e = np.where(finite & (v > 0), np.maximum(e, emin), emin)
    return np.ldexp(1.0, (e - p + 1).astype(np.int64))


def assert_within_abs(actual, expected, bound, what: str = "value", why: str = "") -> None:
    """Assert ``|actual - expected| <= bound`` elementwise (float64; NaN positions must match)."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != expected {e.dtype}"
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    if a.size == 0:
        return
    af, ef = a.astype(np.float64), e.astype(np.float64)
    b = np.broadcast_to(np.asarray(bound, dtype=np.float64), af.shape)
    if not np.array_equal(np.isnan(af), np.isnan(ef)):
        i = tuple(np.argwhere(np.isnan(af) != np.isnan(ef))[0])
        raise AssertionError(f"{what}: NaN positions differ, first at {i}: actual {a[i]!r}, expected {e[i]!r}")
    with np.errstate(invalid="ignore"):
        err = np.where(np.isnan(af) | (af == ef), 0.0, np.abs(af - ef))
    bad = ~(err <= b)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements exceed the bound ({why}); first at {i}: "
                             f"actual {a[i]!r}, expected {e[i]!r}, |diff| {err[i]:.6g} > bound {b[i]:.6g}")


def _literal(v) -> str:
    a = np.asarray(v)
    if a.dtype.name == "bfloat16":
        return f"np.array({a.astype(np.float32).tolist()!r}, dtype=np.float32).astype(ml_dtypes.bfloat16)"
    if a.dtype.kind == "f":
        with np.printoptions(floatmode="unique", threshold=10**9):
            return f"np.array({np.array2string(a, separator=', ')}, dtype=np.{a.dtype.name})"
    return f"np.array({a.tolist()!r}, dtype=np.{a.dtype.name})"


@contextlib.contextmanager
def repro(call: str, **values):
    """Attach a reproduction to any ``AssertionError`` raised inside the block.

    ``call`` is the code that reproduces the check (e.g. ``"check_dynamic_quant('cpu', x, 8)"``),
    ``values`` are the names it uses. Arrays of at most 64 elements are written inline;
    otherwise all arrays are saved to ``REPRO_DIR/<hash>.npz`` and the note shows how to load
    them. Non-array values are written with ``repr``.
    """
    try:
        yield
    except AssertionError as exc:
        arrays = {k: v for k, v in values.items() if isinstance(v, np.ndarray)}
        small = all(v.size <= 64 for v in arrays.values())
        lines = ["Reproduce with (from the repository root):", "    import numpy as np, ml_dtypes",
                 "    from conformance.checks import *"]
        if arrays and not small:
            h = hashlib.sha1(b"".join(np.ascontiguousarray(v).tobytes() for v in arrays.values())).hexdigest()[:12]
            REPRO_DIR.mkdir(parents=True, exist_ok=True)
            path = REPRO_DIR / f"{h}.npz"
            np.savez(path, **{k: (v.view(np.uint16) if v.dtype.name == "bfloat16" else v) for k, v in arrays.items()},
                     **{f"{k}__bf16": np.array(v.dtype.name == "bfloat16") for k, v in arrays.items()})
            lines.append(f"    _d = np.load({str(path)!r})")
            for k in arrays:
                lines.append(f"    {k} = _d[{k!r}].view(ml_dtypes.bfloat16) if _d[{k + '__bf16'!r}] else _d[{k!r}]")
        else:
            for k, v in arrays.items():
                lines.append(f"    {k} = {_literal(v)}")
        for k, v in values.items():
            if k not in arrays:
                lines.append(f"    {k} = {v!r}")
        lines.append(f"    {call}")
        note = "\n".join(lines)
        raise AssertionError(f"{exc}\n{note}") from exc
