"""The ``npu`` backend: thin wrappers over torch_npu ops, the way vLLM Ascend calls them.

Selected only when ``torch_npu`` imports and an NPU is present (``dispatch.backend_status``).
NOT RUN in this project's CI (no NPU): the call sequences follow the facts doc §2 and §5
(vLLM Ascend v0.23.0) and the op-plugin docs; the conformance suite runs them with
``--backend npu`` on an Ascend machine. Numerics are the NPU's own (facts §2): the
dynamic-quant scale may differ from ours by 1 ulp (§2.1), ``deq_scale`` may be consumed
with FP19 precision (§1.5), and W8A16/W4A16 in-kernel precision is undocumented (§2.4).
Differences from vLLM Ascend that follow our reference: W8A16 offsets are negated so that
``w = (q - offset) * scale`` (§1.6); W4A8 quantizes activations per token (per-channel
only here); W4A4 outputs the model dtype directly with the float bias fused.
"""

from __future__ import annotations

import torch

from ..reference import algorithms as A
from .dispatch import Choice, backend_status

__all__ = ["prepare_npu"]


def _npu():
    ok, why = backend_status("npu")
    if not ok:
        raise ValueError(f"backend 'npu' is not available: {why}")
    import torch_npu

    return torch_npu


def prepare_npu(algo, npt, dims, n, k, dt, bias, options):
    """Prepare a layer for the NPU (weights transposed/packed once, as vLLM Ascend does)."""
    torch_npu = _npu()
    from .prepare import PreparedLinear, _bias32, _decode_deq_scale, _f32, _round_through, _to_torch

    dev = torch.device("npu")
    st: dict = {"bias": None if bias is None else _bias32(bias, dt, n).to(dt).to(dev)}
    static = algo == A.W8A8 or (algo == A.W8A8_MIX and options["kv_consumer"])

    if static:
        from .activation_quant import static_quant_params

        recip, off = static_quant_params(_f32(npt["input_scale"]), _f32(npt["input_offset"]), dt)
        st.update(weight=_to_torch(npt["weight"]).t().contiguous().to(dev),
                  recip=recip.to(dt).reshape(1).to(dev), offset=off.to(dt).reshape(1).to(dev),
                  deq_scale=_decode_deq_scale(npt["deq_scale"]).to(dev),
                  quant_bias=_to_torch(npt["quant_bias"]).to(dev) if options["add_quant_bias"] else None)

        def fwd(p, x):
            from .prepare import _nan_nonfinite_rows

            xq = torch_npu.npu_quantize(x, st["recip"], st["offset"], torch.qint8, -1, False)
            return _nan_nonfinite_rows(x, torch_npu.npu_quant_matmul(xq, st["weight"], st["deq_scale"],
                                                                     bias=st["quant_bias"], output_dtype=dt))
    elif algo in (A.W8A8_DYNAMIC, A.W8A8_MIX, A.W4A8_DYNAMIC):
        if algo == A.W4A8_DYNAMIC:
            if "weight_scale_second" in npt:
                raise ValueError("npu backend: per-group W4A8_DYNAMIC linear is not implemented "
                                 "(npu_quant_matmul has no per-group int8 x int4 mode)")
            from .packing import unpack_int8_to_int4
            w = _to_torch(npt["weight"])
            q = w if w.shape[0] == n else unpack_int8_to_int4(w, axis=0)
            s_w = _f32(npt["weight_scale"]).reshape(-1)
        else:
            q = _to_torch(npt["weight"])
            s_w = _round_through(_f32(npt["weight_scale"]).reshape(-1), dt)
        st.update(weight=q.t().contiguous().to(dev), scale=s_w.to(dev))

        def fwd(p, x):
            xq, s_tok = torch_npu.npu_dynamic_quant(x)
            return torch_npu.npu_quant_matmul(xq, st["weight"], st["scale"], pertoken_scale=s_tok,
                                              bias=st["bias"], output_dtype=dt)
    elif algo == A.W4A4_DYNAMIC:
        w = torch_npu.npu_convert_weight_to_int4pack(_to_torch(npt["weight"]).to(torch.int32).to(dev))
        st.update(weight=w, scale=_f32(npt["weight_scale"]).reshape(-1).to(dev))

        def fwd(p, x):
            xq, s_tok = torch_npu.npu_dynamic_quant(x, dst_type=torch.quint4x2)
            return torch_npu.npu_quant_matmul(xq, st["weight"].t(), st["scale"], pertoken_scale=s_tok.flatten(),
                                              bias=st["bias"], output_dtype=dt)
    elif algo == A.W4A4_FLATQUANT_DYNAMIC:
        left = _round_through(_f32(npt["left_trans"]), dt)
        right = npt.get("right_trans")
        lsz = left.shape[0]
        rsz = k // lsz
        p2 = torch.eye(rsz) if right is None else _round_through(_f32(right), dt)
        w = torch_npu.npu_convert_weight_to_int4pack(_to_torch(npt["weight"]).to(torch.int32).to(dev))
        st.update(p1=left.t().contiguous().to(dt).to(dev), p2=p2.to(dt).to(dev), weight=w,
                  scale=_f32(npt["weight_scale"]).reshape(-1).to(dev),
                  clip=float(_f32(npt["clip_ratio"]).reshape(-1)[0]))

        def fwd(p, x):
            xq, s_tok = torch_npu.npu_kronecker_quant(x.view(-1, lsz, rsz), st["p1"], st["p2"],
                                                      clip_ratio=st["clip"], dst_dtype=torch.int32)
            y = torch_npu.npu_quant_matmul(xq.view(-1, k // 8), st["weight"].t(), st["scale"],
                                           pertoken_scale=s_tok, bias=st["bias"], output_dtype=dt)
            return y
    elif algo in (A.W8A16, A.W4A16):
        from ..reference.linear import resolve_group_size
        from .packing import unpack_int32_offset8_to_int4

        g = resolve_group_size("weight_scale", k, dims["G"], options["group_size"])
        s = _round_through(_f32(npt["weight_scale"]), dt)
        if algo == A.W8A16:
            q = _to_torch(npt["weight"])
            # our convention w = (q - offset) * scale; the op adds antiquant_offset (facts §1.6)
            off = -_round_through(_f32(npt["weight_offset"]), dt)
            w = q.t().contiguous().to(dev)
        else:
            q = unpack_int32_offset8_to_int4(_to_torch(npt["weight_packed"]), axis=1)[:, :k]
            off = None
            w = torch_npu.npu_convert_weight_to_int4pack(q.t().contiguous().to(torch.int32).to(dev))
        per_channel = g == k
        st.update(weight=w,
                  scale=(s.reshape(-1) if per_channel else s.t().contiguous()).to(dt).to(dev),
                  offset=None if off is None else (off.reshape(-1) if per_channel else off.t().contiguous()).to(dt).to(dev),
                  group=0 if per_channel else g)

        def fwd(p, x):
            return torch_npu.npu_weight_quant_batchmatmul(x, st["weight"], st["scale"], antiquant_offset=st["offset"],
                                                          bias=st["bias"], antiquant_group_size=st["group"])
    else:  # pragma: no cover
        raise AssertionError(algo)

    return PreparedLinear(algo, dt, n, k, Choice("npu", "npu"), options, st, fwd)
