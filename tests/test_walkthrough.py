"""The reference walkthrough (the interim main job) runs and reports sane accuracy."""

from ascend_quant.cli.main import main
from ascend_quant.cli.walkthrough import linear_rows, moe_rows
from ascend_quant.reference import LINEAR_ALGORITHMS, MOE_ALGORITHMS

# SQNR floors against the float product for Gaussian data (8-bit paths land near 40 dB,
# 4-bit near 14-19 dB; int4 with per-token int4 activations is the lowest). A broken
# scale, offset sign or transpose drops SQNR to ~0 dB or below.
FLOOR_DB = {"W8A16": 35, "W8A8": 30, "W8A8_DYNAMIC": 30, "W8A8_MIX": 30,
            "W4A16": 14, "W4A8_DYNAMIC": 13, "W4A4_DYNAMIC": 10, "W4A4_FLATQUANT_DYNAMIC": 10}


def test_linear_rows_cover_every_algorithm_with_sane_accuracy_and_size():
    rows = linear_rows(8, 256, 64, "bfloat16", seed=1, group_size=64)
    assert [r["algorithm"] for r in rows] == list(LINEAR_ALGORITHMS)
    for r in rows:
        assert r["SQNR dB"] > FLOOR_DB[r["algorithm"]], r
        assert 0.2 < r["vs bf16"] < 0.6, r


def test_moe_rows_cover_every_moe_algorithm():
    rows = moe_rows(4, 64, 32, 4, 2, "bfloat16", seed=2)
    assert [r["algorithm"] for r in rows] == list(MOE_ALGORITHMS)
    for r in rows:
        assert r["SQNR dB"] > FLOOR_DB[r["algorithm"]] - 2, r


def test_walkthrough_command_prints_every_algorithm(capsys):
    assert main(["walkthrough", "--m", "2", "--k", "128", "--n", "32", "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    for algo in LINEAR_ALGORITHMS:
        assert algo in out
