"""``ascend-quant inspect``: exit 0 and a per-layer / per-algorithm summary for a valid checkpoint;
exit 1 with the precise problem(s) on stderr otherwise."""

from __future__ import annotations

import os

import numpy as np

from ascend_quant.cli.main import main
from ascend_quant.reference import LINEAR_ALGORITHMS

L0 = "model.layers.0"


def test_inspect_valid_checkpoint_prints_summary(tiny_checkpoint, capsys):
    assert main(["inspect", tiny_checkpoint, "--modules", "all"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{tiny_checkpoint}: valid quantized checkpoint (version 1.0.0, group_size 32")
    for algo in LINEAR_ALGORITHMS:
        assert algo in out
    # q_proj: int8 64x64 (4096) + quant_bias int32 [64] (256) + deq_scale int64 [64] (512)
    # + input_scale/offset f32 [1] (8) + f32 bias [64] (256) = 5128 bytes = 5.0 KiB;
    # bf16: 64*64*2 + 64*2 = 8320 bytes -> ratio 8320/5128 = 1.622
    row = next(line for line in out.splitlines() if line.startswith(f"{L0}.self_attn.q_proj "))
    assert row.split()[1:] == ["W8A8", "64", "x", "64", "5.0", "KiB", "1.62x"]
    experts = next(line for line in out.splitlines() if line.startswith("model.layers.1.mlp.experts ("))
    assert "(2 experts, 6 projections)" in experts and "W4A8_DYNAMIC" in experts
    assert any(line.startswith("total ") for line in out.splitlines())


def test_inspect_header_only(tiny_checkpoint, capsys):
    assert main(["inspect", tiny_checkpoint, "--no-values", "--modules", "none"]) == 0
    assert "W4A16" in capsys.readouterr().out


def test_inspect_invalid_checkpoint_exits_nonzero_with_messages(broken, ckpt, capsys):
    name = f"{L0}.mlp.down_proj.weight_scale"
    ckpt.set_tensor(broken, name, np.full((64, 1), -2.0, np.float32))
    os.remove(os.path.join(broken, "config.json"))
    assert main(["inspect", broken]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert f"error: {broken}: {name}: scales must be finite and > 0, found -2.0 at index (0, 0)" in err
    assert "warning: config.json: missing (msModelSlim copies the float model's config.json; vLLM needs it)" in err
    assert err[-1] == f"{broken}: INVALID (1 problem(s))"


def test_inspect_missing_directory(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    assert f"error: {tmp_path / 'nope'}: not a directory" in capsys.readouterr().err
