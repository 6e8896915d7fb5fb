"""Linear forward of every algorithm ID vs bf16 ``F.linear`` and vLLM-CPU's kernels.

Rows (one pytest-benchmark entry each; ratios are same-run, interleaved medians):

* ``test_bench_linear[shape-ALGO-mM]``: ``optimized.apply_linear`` (default kernel choice,
  or a forced one: ``ALGO[kernel]``), interleaved with bf16 and the algorithm's first peer;
* ``test_bench_linear[shape-peer:PEER-mM]``: a peer kernel interleaved with bf16;
* ``test_bench_linear[shape-bf16-mM]``: bf16 alone (absolute reference).

Rows run shape by shape (bf16, peers, algorithms), so each shape's weights are built once.

Shapes: K = N = 4096 at M in {1, 16, 256, 1024}, Qwen3-8B qkv/o/gate_up/down at TP 1 and 2
at M in {1, 256}. Weights are made by the reference quantizers from one random float
weight per shape; prepare time is excluded.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import benchlib as bl

# (shape, label) cases: labels are algorithm IDs, VARIANTS ("W4A8_DYNAMIC:g256") or forced
# kernels ("W8A8_DYNAMIC[int-mm]"), extra rows on the square shape in the full scope only.
EXTRA_SQUARE = ("W4A8_DYNAMIC:g256", "W8A8_DYNAMIC[int-mm]", "W8A8_DYNAMIC[vllm-onednn]",
                "W8A8_DYNAMIC[onednn]") if bl.SCOPE == "full" else ()
SHAPES = (bl.SQUARE, *bl.MODEL_SHAPES)


def _ms(shape: bl.Shape) -> tuple[int, ...]:
    return bl.SQUARE_M if shape == bl.SQUARE else bl.MODEL_M


def _labels(shape: bl.Shape) -> tuple[str, ...]:
    return bl.ALGOS + (EXTRA_SQUARE if shape == bl.SQUARE else ())


ALL_PEERS = ("vllm-bf16-onednn", *dict.fromkeys(p for ps in bl.LINEAR_PEERS.values() for p in ps))
PRIMARY_PEERS = tuple(dict.fromkeys(ps[0] for ps in bl.LINEAR_PEERS.values()))


def _peers(shape: bl.Shape) -> tuple[str, ...]:
    return ALL_PEERS if shape == bl.SQUARE else PRIMARY_PEERS


# --------------------------------------------------------------------------------------
# per-shape shared state (module-scoped fixtures: one shape alive at a time)
# --------------------------------------------------------------------------------------

class ShapeState:
    def __init__(self, shape: bl.Shape, slow: bl.Slow):
        self.shape, self.slow = shape, slow
        self.w = bl.float_weight(shape.n, shape.k)
        self.bf16 = bl.bf16_linear_copies(self.w)
        self.peers: dict[str, list | str] = {}

    def peer(self, name: str) -> list | str:
        """Copies of peer ``name`` (callables), or the reason it cannot run."""
        if name not in self.peers:
            wt = torch.from_numpy(self.w)
            try:
                c = bl.copies_for(bl.peer_bytes(name, self.shape.n, self.shape.k))
                self.peers[name] = [bl.make_peer(name, wt) for _ in range(c)]
            except Exception as e:  # a peer that cannot run here is reported, not fatal
                self.peers[name] = f"{type(e).__name__}: {str(e)[:200]}"
        return self.peers[name]


# One shape alive at a time (model shapes are large): the rows below are ordered shape by
# shape, and these single-entry caches are replaced when the shape (or case) changes.
_STATE: dict[str, ShapeState] = {}
_CASE: dict[tuple[str, str], "Case"] = {}


def shape_state(shape: bl.Shape, registry: dict) -> ShapeState:
    if shape.id not in _STATE:
        _CASE.clear()
        _STATE.clear()
        _STATE[shape.id] = ShapeState(shape, registry.setdefault(shape.id, bl.Slow()))
    return _STATE[shape.id]


@pytest.fixture(scope="module", autouse=True)
def _free_caches():
    yield
    _CASE.clear()
    _STATE.clear()


def _parse(label: str) -> tuple[str, str | None]:
    if label.endswith("]"):
        base, kern = label[:-1].split("[")
        return base, kern
    return label, None


class Case:
    def __init__(self, label: str, state: ShapeState):
        self.shape, self.label, self.state = state.shape, label, state
        base, kern = _parse(label)
        self.algo, tensors, opts = bl.checkpoint(base, state.w)
        if kern is not None:
            opts["kernel"] = kern
        first = bl.prepare_copies(self.algo, tensors, 1, **opts)[0]
        self.resident = first.resident_bytes()
        # copies from the fewest bytes any M streams (W4A16's packed int4 copy at small M)
        n_copies = bl.copies_for(min(bl.stream_bytes(first, m) for m in (1, 1024)))
        self.layers = [first] + bl.prepare_copies(self.algo, tensors, n_copies - 1, **opts)
        del tensors
        self.peer_name = bl.LINEAR_PEERS[self.algo][0]


def get_case(shape: bl.Shape, label: str, registry: dict) -> Case:
    st = shape_state(shape, registry)
    key = (shape.id, label)
    if key not in _CASE:
        _CASE.clear()
        try:
            _CASE[key] = Case(label, st)
        except Exception as e:  # e.g. a forced kernel that cannot run here
            _CASE[key] = f"{type(e).__name__}: {str(e)[:300]}"
    c = _CASE[key]
    if isinstance(c, str):
        bl.record_skip(f"{label} on {shape.id}: cannot prepare ({c})", kind="linear", label=label,
                       shape=shape.name, n=shape.n, k=shape.k)
    return c


# rows, shape by shape: bf16, then peers, then algorithms (M innermost)
ROWS: list[tuple[bl.Shape, str, str, int]] = []
for _s in SHAPES:
    ROWS += [(_s, "bf16", "bf16", m) for m in _ms(_s)]
    ROWS += [(_s, "peer", p, m) for p in _peers(_s) for m in _ms(_s)]
    ROWS += [(_s, "linear", lab, m) for lab in _labels(_s) for m in _ms(_s)]
_IDS = [f"{s.id}-{'peer:' if kind == 'peer' else ''}{lab}-m{m}" for s, kind, lab, m in ROWS]


def _common_info(shape: bl.Shape, m: int, meas: bl.Measured, t: float) -> dict:
    flops = 2 * m * shape.n * shape.k
    return {"shape": shape.name, "n": shape.n, "k": shape.k, "m": m, "ms": t * 1e3, "ms_min": min(meas.candidate) * 1e3,
            "tops": flops / t / 1e12, "rounds": meas.rounds, "iqr_rel": meas.iqr_rel(),
            "load_before": meas.load_before, "load_after": meas.load_after, "cache": bl.CACHE}


@pytest.mark.parametrize("shape,kind,label,m", ROWS, ids=_IDS)
def test_bench_linear(benchmark, slow_registry, shape: bl.Shape, kind: str, label: str, m: int):
    if kind == "bf16":
        _bench_bf16(benchmark, shape_state(shape, slow_registry), m)
    elif kind == "peer":
        _bench_peer(benchmark, shape_state(shape, slow_registry), label, m)
    else:
        _bench_algo(benchmark, get_case(shape, label, slow_registry), m)


def _bench_algo(benchmark, case: Case, m: int) -> None:
    shape, st = case.shape, case.state
    benchmark.group = f"linear {shape.id} M={m}"
    x = bl.activations(m, shape.k)
    cand = bl.Rotating(case.layers, x)
    others = {"bf16": bl.bf16_call(st.bf16, x)}
    peer = st.peer(case.peer_name)
    if isinstance(peer, list):
        others[case.peer_name] = bl.Rotating(peer, x)
    try:
        meas = bl.measure(benchmark, cand, others, m=m, slow=st.slow, cand_name=case.label)
    except bl.TooSlow as e:
        bl.skip_too_slow(e, benchmark, kind="linear", label=case.label, algo=case.algo, shape=shape.name,
                         n=shape.n, k=shape.k, m=m, kernel=bl.kernel_name(case.layers[0], m))
    t = meas.median()
    info = _common_info(shape, m, meas, t)
    info.update(kind="linear", label=case.label, algo=case.algo, kernel=bl.kernel_name(case.layers[0], m),
                bf16_ms=meas.median("bf16") * 1e3, ratio_bf16=meas.ratio("bf16"),
                ratio_bf16_min=meas.ratio_min("bf16"), weight_bytes=case.resident, bf16_bytes=2 * shape.n * shape.k,
                stream_bytes=bl.stream_bytes(case.layers[0], m),
                weight_gbs=bl.stream_bytes(case.layers[0], m) / t / 1e9, copies=len(case.layers),
                peer=case.peer_name, dropped=meas.dropped)
    if case.peer_name in meas.others:
        info.update(peer_ms=meas.median(case.peer_name) * 1e3, ratio_peer=meas.ratio(case.peer_name),
                    ratio_peer_min=meas.ratio_min(case.peer_name))
    elif not isinstance(peer, list):
        info["peer_unavailable"] = peer
    benchmark.extra_info.update(info)
    # sanity (outside the timing): the benchmarked layer computes the layer
    y = case.layers[0](x)
    y_ref = F.linear(x, st.bf16[0])
    err = bl.rel_error(y, y_ref)
    benchmark.extra_info["rel_err_vs_bf16"] = err
    assert err <= bl.SANITY[case.algo], f"{case.label}: relative error {err:.3g} vs the bf16 layer"


def _bench_peer(benchmark, st: ShapeState, peer_name: str, m: int) -> None:
    shape = st.shape
    benchmark.group = f"linear {shape.id} M={m}"
    peer = st.peer(peer_name)
    if not isinstance(peer, list):
        bl.record_skip(f"{peer_name} cannot run here: {peer}", kind="peer", label=peer_name, shape=shape.name,
                       n=shape.n, k=shape.k, m=m)
    x = bl.activations(m, shape.k)
    try:
        meas = bl.measure(benchmark, bl.Rotating(peer, x), {"bf16": bl.bf16_call(st.bf16, x)}, m=m,
                          slow=st.slow, cand_name=peer_name)
    except bl.TooSlow as e:
        bl.skip_too_slow(e, benchmark, kind="peer", label=peer_name, shape=shape.name, n=shape.n, k=shape.k, m=m)
    t = meas.median()
    info = _common_info(shape, m, meas, t)
    nbytes = bl.peer_bytes(peer_name, shape.n, shape.k)
    info.update(kind="peer", label=peer_name, what=bl.PEER_SPECS[peer_name].what,
                bf16_ms=meas.median("bf16") * 1e3, ratio_bf16=meas.ratio("bf16"),
                ratio_bf16_min=meas.ratio_min("bf16"), weight_bytes=nbytes, bf16_bytes=2 * shape.n * shape.k, weight_gbs=nbytes / t / 1e9,
                copies=len(peer))
    benchmark.extra_info.update(info)
    err = bl.rel_error(peer[0](x), F.linear(x, st.bf16[0]))
    benchmark.extra_info["rel_err_vs_bf16"] = err
    bound = 0.05 if peer_name in ("vllm-onednn-w8a8-dyn", "vllm-sgl-w8a8-dyn", "torch-int8pack-w8a16",
                                  "vllm-bf16-onednn") else 0.3
    if peer_name == "vllm-onednn-w8a8-static":
        bound = 0.5   # fixed input scale 4/127 clips N(0,1) activations beyond 4 sigma: speed row only
    assert err <= bound, f"{peer_name}: relative error {err:.3g} vs the bf16 layer"


def _bench_bf16(benchmark, st: ShapeState, m: int) -> None:
    shape = st.shape
    benchmark.group = f"linear {shape.id} M={m}"
    x = bl.activations(m, shape.k)
    meas = bl.measure(benchmark, bl.bf16_call(st.bf16, x), {}, m=m, slow=st.slow, cand_name="bf16")
    t = meas.median()
    info = _common_info(shape, m, meas, t)
    info.update(kind="bf16", label="bf16", weight_bytes=2 * shape.n * shape.k,
                weight_gbs=2 * shape.n * shape.k / t / 1e9, copies=len(st.bf16))
    benchmark.extra_info.update(info)
