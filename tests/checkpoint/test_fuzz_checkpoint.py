"""Fuzzing the checkpoint validator and reader: random corruptions of a valid tiny checkpoint.

Starting from the tiny checkpoint of tests/checkpoint_fixtures.py (every linear algorithm ID, MoE
experts, three shards + index), each example applies one to three corruptions drawn from
:data:`CORRUPTIONS` (description / index / config JSON: dropped, renamed or retyped keys, wrong
algorithm IDs, wrong top-level values, truncated or garbled bytes, deleted files; safetensors:
garbled header bytes, header dtype / shape / offsets changed, truncated or extended files, tensor
values set to NaN, inf, 0, negatives, subnormals, huge values or int4-out-of-range integers, bit
flips, tensors removed, duplicated, re-typed or reshaped, shards deleted, index entries pointing at
missing shards) and then requires, under a time limit:

* :func:`validate_checkpoint` returns (never raises, never hangs); each problem is a
  :class:`CheckpointError` whose message starts with the directory and names a key, tensor or file;
* :func:`read_quantized_model` (the loader) raises nothing but :class:`CheckpointError`, and with
  ``validate=True`` succeeds exactly when the validator reports no problem;
* when it succeeds: the ``safetensors`` library (vLLM's reader) opens every shard and returns the
  same tensors, and the reference forward of every quantized module (linear, and each MoE block
  through the MoE reference with every expert routed) on fixed activations is finite, and
  bit-identical to the uncorrupted checkpoint's for every module whose tensors (and the
  description's group size) are unchanged. A non-finite output is accepted only when the
  corruption made one of the module's float values at least 1000x larger than any the
  uncorrupted tensor holds (a huge but valid scale: the checkpoint is consistent, the float32
  epilogue overflows as specified).

Bounded: the example count is fixed here (``ci`` 600, ``nightly`` 5000, else 40; 15-90 ms
each), every example runs under a 20 s alarm, deadline none.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ascend_quant.checkpoint.errors import CheckpointError
from ascend_quant.checkpoint.io import WEIGHTS_INDEX_FILE, read_quantized_model, read_safetensors
from ascend_quant.checkpoint.validate import validate_checkpoint
from ascend_quant.reference.linear import linear_forward
from ascend_quant.reference.moe import moe_forward

DESC = "quant_model_description.json"
EXAMPLES = {"ci": 600, "nightly": 5000}.get(settings.get_current_profile_name(), 40)
TIME_LIMIT_S = 20

# ---------------------------------------------------------------------------------------
# corruptions: each takes (directory, hypothesis data) and returns a label for the statistics
# ---------------------------------------------------------------------------------------

_IDS = ["W8A8_DYNAMICX", "w8a8_dynamic", "W8A8S", "W8A8_MXFP8", "W4A4_MXFP4", "", "FLOAT", "W4A16", "W8A16",
        "W8A8", "W8A8_DYNAMIC", "W8A8_MIX", "W4A8_DYNAMIC", "W4A4_DYNAMIC", "W4A4_FLATQUANT_DYNAMIC"]
_WRONG_TYPES = [1, -1, 1.5, None, [], {}, True, "x", [1, 2], {"a": "b"}]
_ST_DTYPES = ["F32", "F16", "BF16", "I8", "U8", "I32", "I64", "F64", "BOOL", "F8_E4M3", "F33", "", 7]


def _json_files(d):
    return [fn for fn in (DESC, WEIGHTS_INDEX_FILE, "config.json") if os.path.isfile(os.path.join(d, fn))]


def _shards(d):
    return sorted(fn for fn in os.listdir(d) if fn.endswith(".safetensors"))


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _pick(data, seq, label):
    return data.draw(st.sampled_from(sorted(seq) if isinstance(seq, (set, frozenset)) else list(seq)), label=label)


def _json_edit(d, data, kind):
    files = _json_files(d)
    if not files:
        return "json: none left"
    fn = _pick(data, files, "json file")
    path = os.path.join(d, fn)
    obj = _read_json(path)
    target = obj.get("weight_map") if fn == WEIGHTS_INDEX_FILE and isinstance(obj, dict) else obj
    if not isinstance(target, dict) or not target:
        return f"json {kind}: {fn} not an object"
    key = _pick(data, target, "key")
    if kind == "drop":
        del target[key]
    elif kind == "rename":
        new = data.draw(st.sampled_from([key + "x", key[:-1], key.replace("weight", "weights"),
                                         key.replace("layers.0", "layers.7"), key.upper(), " " + key]), label="new key")
        target[new] = target.pop(key)
    elif kind == "retype":
        target[key] = data.draw(st.sampled_from(_WRONG_TYPES), label="value")
    elif kind == "wrong_id":
        if fn != DESC:
            return "json wrong_id: not the description"
        target[key] = data.draw(st.sampled_from(_IDS), label="id")
    _write_json(path, obj)
    return f"json {kind} in {fn}"


def c_json_drop(d, data):
    return _json_edit(d, data, "drop")


def c_json_rename(d, data):
    return _json_edit(d, data, "rename")


def c_json_retype(d, data):
    return _json_edit(d, data, "retype")


def c_json_wrong_id(d, data):
    return _json_edit(d, data, "wrong_id")


def c_json_top_level(d, data):
    path = os.path.join(d, DESC)
    obj = _read_json(path)
    if not isinstance(obj, dict):
        return "top-level: description unreadable"
    key = data.draw(st.sampled_from(["group_size", "version", "model_quant_type", "metadata", "kv_cache_type"]),
                    label="top key")
    obj[key] = data.draw(st.sampled_from([-1, 0, 16, 33, 48, 64, 128, "32", None, 1.0, "1.0.0", "W8A8", {}, [],
                                          "C8"]), label="top value")
    _write_json(path, obj)
    return f"top-level {key}"


def c_json_not_object(d, data):
    fn = _pick(data, _json_files(d) or [DESC], "json file")
    _write_json(os.path.join(d, fn), data.draw(st.sampled_from([[], "x", 1, None]), label="json"))
    return f"json not an object: {fn}"


def c_json_bytes(d, data):
    files = _json_files(d)
    if not files:
        return "json bytes: none left"
    fn = _pick(data, files, "json file")
    path = os.path.join(d, fn)
    raw = bytearray(open(path, "rb").read())
    how = data.draw(st.sampled_from(["truncate", "garble", "empty", "append"]), label="how")
    if not raw and how in ("truncate", "garble"):
        how = "append"
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="cut")]
    elif how == "garble":
        for _ in range(data.draw(st.integers(1, 4), label="n bytes")):
            raw[data.draw(st.integers(0, len(raw) - 1), label="at")] = data.draw(st.integers(0, 255), label="byte")
    elif how == "empty":
        raw = bytearray()
    else:
        raw += data.draw(st.sampled_from([b"x", b"}", b"\xff\xfe", b"{}", b" \n"]), label="tail")
    open(path, "wb").write(bytes(raw))
    return f"json {how}: {fn}"


def c_delete_file(d, data):
    files = _json_files(d) + _shards(d)
    if not files:
        return "delete: nothing left"
    fn = _pick(data, files, "file")
    os.remove(os.path.join(d, fn))
    return f"delete {fn if fn.endswith('.json') else 'a shard'}"


def c_index_pointer(d, data):
    path = os.path.join(d, WEIGHTS_INDEX_FILE)
    index = _read_json(path)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        return "index pointer: no weight_map"
    name = _pick(data, wm, "tensor")
    wm[name] = data.draw(st.sampled_from(["quant_model_weights-00009-of-00009.safetensors", *_shards(d)]),
                         label="shard")
    _write_json(path, index)
    return "index points elsewhere"


def _shard_parts(path):
    raw = open(path, "rb").read()
    if len(raw) < 8:
        return None
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        return None
    try:
        header = json.loads(raw[8: 8 + n])
    except ValueError:
        return None
    return (header, raw[8 + n:]) if isinstance(header, dict) else None


def _write_shard(path, header, body):
    h = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(h)) + h + body)


def c_header_edit(d, data):
    shards = _shards(d)
    if not shards:
        return "header: no shard"
    path = os.path.join(d, _pick(data, shards, "shard"))
    parts = _shard_parts(path)
    if parts is None:
        return "header: unparsable"
    header, body = parts
    names = [k for k in header if k != "__metadata__"]
    if not names:
        return "header: empty"
    name = _pick(data, names, "tensor")
    spec = header[name]
    if not isinstance(spec, dict):
        return "header: entry not an object"
    what = data.draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "metadata"]), label="field")
    if what == "dtype":
        spec["dtype"] = data.draw(st.sampled_from(_ST_DTYPES), label="dtype")
    elif what == "shape":
        shape = list(spec.get("shape") or [1])
        choice = data.draw(st.sampled_from(["reverse", "flatten", "split", "grow", "negative", "junk"]), label="how")
        if choice == "reverse":
            shape = shape[::-1]
        elif choice == "flatten":
            shape = [int(np.prod(shape))]
        elif choice == "split" and shape and shape[0] % 2 == 0:
            shape = [2, shape[0] // 2, *shape[1:]]
        elif choice == "grow":
            shape = [s + 1 for s in shape] or [1]
        elif choice == "negative":
            shape = [-s for s in shape] or [-1]
        else:
            shape = ["a"]
        spec["shape"] = shape
    elif what == "offsets":
        off = spec.get("data_offsets") or [0, 0]
        delta = data.draw(st.sampled_from([-4, -1, 1, 4, 10**12]), label="delta")
        spec["data_offsets"] = [off[0] + delta, off[1] + delta] if data.draw(st.booleans(), label="both") \
            else [off[0], off[1] + delta]
    elif what == "drop":
        del header[name]
    else:
        header["__metadata__"] = data.draw(st.sampled_from([{"format": 1}, [], "pt", {"format": "pt"}]), label="meta")
    _write_shard(path, header, body)
    return f"header {what}"


def c_raw_bytes(d, data):
    shards = _shards(d)
    if not shards:
        return "bytes: no shard"
    path = os.path.join(d, _pick(data, shards, "shard"))
    raw = bytearray(open(path, "rb").read())
    if not raw:
        return "bytes: empty shard"
    n = struct.unpack("<Q", bytes(raw[:8]))[0] if len(raw) >= 8 else 0
    how = data.draw(st.sampled_from(["header byte", "length field", "truncate", "append", "data bit"]), label="how")
    if how == "header byte":
        raw[data.draw(st.integers(8, max(8, min(len(raw), 8 + n) - 1)), label="at") % len(raw)] = \
            data.draw(st.integers(0, 255), label="byte")
    elif how == "length field":
        raw[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, max(0, n - 1), n + 1, n + 8, 2**63, 2**64 - 1,
                                                               len(raw)]), label="n"))
    elif how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")]
    elif how == "append":
        raw += bytes(data.draw(st.integers(1, 64), label="extra"))
    else:  # one bit of the data area: a tensor value changes (any bit: sign, exponent, mantissa)
        if len(raw) <= 8 + n:
            return "bytes: no data area"
        at = data.draw(st.integers(8 + n, len(raw) - 1), label="at")
        raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    open(path, "wb").write(bytes(raw))
    return f"shard {how}"


def _edit_tensors(d, data, edit, label):
    shards = _shards(d)
    if not shards:
        return f"{label}: no shard"
    fn = _pick(data, shards, "shard")
    try:
        arrays = {k: np.array(v) for k, v in read_safetensors(os.path.join(d, fn)).items()}
    except CheckpointError:
        return f"{label}: unreadable shard"
    if not arrays:
        return f"{label}: empty shard"
    result = edit(arrays, fn)
    from safetensors.numpy import save_file

    save_file(arrays, os.path.join(d, fn), metadata={"format": "pt"})
    return result


_FLOAT_SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0, 1e-39, 1e-30, 3e-8, 1e38, 65504.0 * 2, 0.5, 2.0]
_INT_SPECIALS = [8, -9, 7, -8, 127, -128, 0, 1, -1, 2**31 - 1, -(2**31), 2**40]


def c_tensor_value(d, data):
    def edit(arrays, fn):
        name = _pick(data, arrays, "tensor")
        a = arrays[name]
        if a.size == 0:
            return "value: empty tensor"
        i = data.draw(st.integers(0, a.size - 1), label="index")
        flat = a.reshape(-1)
        if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
            v = data.draw(st.sampled_from(_FLOAT_SPECIALS), label="value")
            flat[i] = flat[i] * v if v in (0.5, 2.0) else v
        elif a.dtype.kind in "iu":
            v = data.draw(st.sampled_from(_INT_SPECIALS), label="value")
            info = np.iinfo(a.dtype)
            flat[i] = min(max(v, info.min), info.max)
            if a.dtype == np.int64 and name.endswith("deq_scale"):
                bits = data.draw(st.sampled_from([0x7FC00000, 0x7F800000, 0xBF800000, 0, 1, 0x3F800000]),
                                 label="float32 bits")
                flat[i] = bits
        else:
            return "value: other dtype"
        return f"value of {name.rsplit('.', 1)[-1]}"

    return _edit_tensors(d, data, edit, "value")


def c_tensor_structure(d, data):
    def edit(arrays, fn):
        name = _pick(data, arrays, "tensor")
        a = arrays[name]
        how = data.draw(st.sampled_from(["remove", "duplicate", "copy elsewhere", "cast", "reshape", "transpose",
                                         "truncate"]), label="how")
        if how == "remove":
            del arrays[name]
        elif how == "duplicate":
            arrays[name + "_copy"] = a.copy()
        elif how == "copy elsewhere":
            others = [s for s in _shards(d) if s != fn]
            if not others:
                return "structure: one shard"
            other = os.path.join(d, others[0])
            try:
                more = {k: np.array(v) for k, v in read_safetensors(other).items()}
            except CheckpointError:
                return "structure: unreadable shard"
            more[name] = a.copy()
            from safetensors.numpy import save_file

            save_file(more, other, metadata={"format": "pt"})
        elif how == "cast":
            to = data.draw(st.sampled_from([np.float16, np.float32, np.int8, np.int32, np.int64, np.float64]),
                           label="to")
            with np.errstate(all="ignore"):
                arrays[name] = a.astype(to)
        elif how == "reshape":
            arrays[name] = a.reshape(-1)
        elif how == "transpose":
            arrays[name] = np.ascontiguousarray(a.T)
        else:
            arrays[name] = a.reshape(-1)[: max(0, a.size - 1)].copy()
        return f"tensor {how}"

    return _edit_tensors(d, data, edit, "structure")


def c_json_reorder(d, data):
    """A no-op: the description's keys in another order."""
    path = os.path.join(d, DESC)
    obj = _read_json(path)
    if not isinstance(obj, dict):
        return "reorder: description unreadable"
    _write_json(path, dict(reversed(list(obj.items()))))
    return "no-op: reorder description"


CORRUPTIONS = [c_json_drop, c_json_rename, c_json_retype, c_json_wrong_id, c_json_top_level, c_json_not_object,
               c_json_bytes, c_delete_file, c_index_pointer, c_header_edit, c_raw_bytes, c_tensor_value,
               c_tensor_structure, c_json_reorder]


# ---------------------------------------------------------------------------------------
# the property
# ---------------------------------------------------------------------------------------

@contextmanager
def _time_limit(seconds):
    def fire(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _module_outputs(ck, modules):
    """``{prefix: (identity, y)}``: the reference forward of each quantized module on fixed
    activations (seeded by the module's K), ``identity`` = its tensors' bytes and the group size."""
    group = ck.description.group_size
    out = {}
    for prefix, m in modules.items():
        if m.algorithm == "FLOAT":
            continue
        tensors = ck.module_tensors(prefix)
        ident = (group, tuple(sorted((s, a.dtype.str, a.shape, a.tobytes()) for s, a in tensors.items())))
        bias = tensors.pop("bias", None)
        x = np.random.default_rng(m.k).standard_normal((3, m.k)).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            y = linear_forward(m.algorithm, x, tensors, dtype="float32", bias=bias, group_size=group or None)
        out[prefix] = (ident, y, tensors)
    # MoE blocks through the MoE reference (its own load-time rules), every expert routed
    blocks: dict[str, dict[int, str]] = {}
    for prefix, m in modules.items():
        if m.expert_of is not None and m.algorithm != "FLOAT":
            e = int(prefix[len(m.expert_of) + 1:].split(".")[0])
            blocks.setdefault(m.expert_of, {})[e] = m.algorithm
    for experts, algos in blocks.items():
        algo = algos[0]
        expert_list = [{p: {k: v for k, v in ck.module_tensors(f"{experts}.{e}.{p}").items() if k != "bias"}
                        for p in ("gate_proj", "up_proj", "down_proj")} for e in sorted(algos)]
        hidden = expert_list[0]["down_proj"]["weight_scale"].shape[0]
        tokens = 2 * len(expert_list)
        x = np.random.default_rng(hidden).standard_normal((tokens, hidden)).astype(np.float32)
        ids = (np.arange(tokens) % len(expert_list)).reshape(-1, 1)
        with np.errstate(over="ignore", invalid="ignore"):
            y = moe_forward(algo, x, expert_list, np.ones((tokens, 1), np.float32), ids, dtype="float32",
                            group_size=group or None)
        flat = {f"{e}.{p}.{k}": v for e, ex in enumerate(expert_list) for p, t in ex.items() for k, v in t.items()}
        ident = (group, tuple(sorted((k, a.dtype.str, a.shape, a.tobytes()) for k, a in flat.items())))
        out[experts + " (MoE)"] = (ident, y, flat)
    return out


def _grown_1000x(now: dict, before: dict) -> bool:
    """A float value of ``now`` at least 1000x larger than every value of the same tensor before
    (int64 deq_scale decoded as float32 bits)."""
    from ascend_quant.reference.scale_encoding import deq_scale_as_float32

    def as_f64(a):
        if a.dtype == np.int64:
            try:
                return deq_scale_as_float32(a, "deq_scale").astype(np.float64)
            except ValueError:
                return np.zeros(1)
        return np.asarray(a).astype(np.float64)

    for s, a in now.items():
        if s in before and (a.dtype.kind == "f" or a.dtype.name == "bfloat16" or s == "deq_scale"):
            big, ref = np.abs(as_f64(a)).max(initial=0), np.abs(as_f64(before[s])).max(initial=0)
            if big >= 1000 * ref:
                return True
    return False


class _Outputs(dict):
    def __repr__(self) -> str:  # Hypothesis prints the fixtures of a failing example
        return f"<reference outputs of {len(self)} modules>"


@pytest.fixture(scope="module")
def pristine(tiny_checkpoint):
    report = validate_checkpoint(tiny_checkpoint, raise_errors=True)
    ck = read_quantized_model(tiny_checkpoint, validate=True)
    return _Outputs(_module_outputs(ck, report.modules))


STATS: dict[str, dict[str, int]] = {}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_checkpoints_load_correctly_or_raise_checkpoint_error(tiny_checkpoint, pristine, tmp_path_factory,
                                                                         data):
    d = str(tmp_path_factory.mktemp("fuzz") / "model")
    shutil.copytree(tiny_checkpoint, d)
    ops = data.draw(st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=3), label="corruptions")
    labels = [op(d, data) for op in ops]
    try:
        with _time_limit(TIME_LIMIT_S):
            report = validate_checkpoint(d)
            for e in report.errors:
                assert isinstance(e, CheckpointError)
                assert str(e).startswith(d + ": "), str(e)
                assert e.key or "quant_model_weight" in e.problem, f"names no key/tensor/file: {e}"
            try:
                read_quantized_model(d)
            except CheckpointError as e:
                assert str(e).startswith(d), str(e)
            try:
                ck = read_quantized_model(d, validate=True)
            except CheckpointError as e:
                assert not report.ok, f"loader refused a checkpoint the validator accepts: {e}"
                ck = None
            assert (ck is not None) == report.ok
            outcome = "rejected" if ck is None else "loaded"
            if ck is not None:
                _check_loaded(d, ck, report, pristine)
    finally:
        shutil.rmtree(os.path.dirname(d), ignore_errors=True)
    for label in labels:
        STATS.setdefault(label, {"rejected": 0, "loaded": 0})[outcome] += 1


def _check_loaded(d, ck, report, pristine):
    from safetensors import safe_open

    # vLLM reads shards with the safetensors library: it must accept them and see the same tensors
    seen = set()
    for fn in _shards(d):
        with safe_open(os.path.join(d, fn), "np") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name in ck.tensors and name not in seen:
                    ours = ck.tensors[name]
                    if ours.dtype.name != "bfloat16":
                        assert t.dtype == ours.dtype and t.shape == ours.shape and t.tobytes() == ours.tobytes(), name
                    seen.add(name)
    assert seen == set(ck.tensors)
    outputs = _module_outputs(ck, report.modules)
    for prefix, (ident, y, tensors) in outputs.items():
        before = pristine.get(prefix)
        if before is not None and before[0] == ident:
            assert np.array_equal(y, before[1]), f"{prefix}: unchanged tensors, different output"
        elif not np.isfinite(y).all():
            assert before is not None and _grown_1000x(tensors, before[2]), \
                f"{prefix}: the validator accepted it but the reference output is not finite"


def test_fuzz_statistics_cover_every_corruption():
    """Runs after the fuzz test (same module): every corruption kind was drawn, and both outcomes
    occurred (a fuzzer that only ever produces rejected checkpoints would test nothing)."""
    if not STATS:
        pytest.skip("the fuzz test did not run in this session (deselected)")
    for label, counts in sorted(STATS.items()):  # shown with -s
        print(f"{label:<50} rejected {counts['rejected']:>4}  loaded {counts['loaded']:>4}")
    drawn = {label.split(" ")[0] for label in STATS}
    assert {"json", "top-level", "header", "shard", "value", "tensor", "no-op:"} <= drawn, sorted(drawn)
    total = {k: sum(v[k] for v in STATS.values()) for k in ("rejected", "loaded")}
    assert total["rejected"] > 0 and total["loaded"] > 0, total
