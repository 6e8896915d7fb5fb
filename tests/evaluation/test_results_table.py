"""The demo table as cells, Markdown and terminal text, against hand-written expectations."""

from __future__ import annotations

from ascend_quant.evaluation.results_table import COLUMN_DEFINITIONS, COLUMNS, markdown_table, table_cells, text_table

ROWS = [
    {"algorithm": "float", "kind": "float", "weight_bytes": 8 * 2**20, "size_ratio": 1.0, "ppl": 47.738,
     "ppl_ratio": 1.0, "agreement": {"top1_agreement": 1.0, "max_abs_dlogprob": 0.000316},
     "decode_tokens_per_s": 52.34, "speed_ratio": 1.0},
    {"algorithm": "W4A4_DYNAMIC", "kind": "quantized", "weight_bytes": 5 * 2**20 + 2**19, "size_ratio": 0.6874,
     "ppl": 49.5, "ppl_ratio": 1.03691, "agreement": {"top1_agreement": 251 / 256, "max_abs_dlogprob": 0.25},
     "decode_tokens_per_s": 40.0, "speed_ratio": 0.7642},
    {"algorithm": "W8A16", "kind": "quantized", "error": "MeasurementError: boom"},
]


def test_cells_by_hand():
    assert table_cells(ROWS) == [
        ["float", "8.00", "1.000", "47.74", "1.0000", "100.0%", "3.2e-04", "52.3", "1.00"],
        ["W4A4_DYNAMIC", "5.50", "0.687", "49.50", "1.0369", "98.0%", "0.250", "40.0", "0.76"],
        ["W8A16", "-", "-", "-", "-", "-", "-", "-", "failed"],
    ]
    exact = dict(ROWS[0], agreement={"top1_agreement": 1.0, "max_abs_dlogprob": 0.0})
    assert table_cells([exact])[0][6] == "0"


def test_markdown_by_hand():
    assert markdown_table(ROWS) == (
        "| algorithm | size MiB | size vs float | ppl | ppl vs float | top-1 agree | max \\|dlogp\\| | decode tok/s "
        "| speed vs float |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        "| float | 8.00 | 1.000 | 47.74 | 1.0000 | 100.0% | 3.2e-04 | 52.3 | 1.00 |\n"
        "| W4A4_DYNAMIC | 5.50 | 0.687 | 49.50 | 1.0369 | 98.0% | 0.250 | 40.0 | 0.76 |\n"
        "| W8A16 | - | - | - | - | - | - | - | failed |\n"
    )


def test_text_by_hand():
    assert text_table(ROWS[:2]) == (
        "algorithm     size MiB  size vs float    ppl  ppl vs float  top-1 agree  max |dlogp|  decode tok/s  speed vs float\n"
        "------------  --------  -------------  -----  ------------  -----------  -----------  ------------  --------------\n"
        "float             8.00          1.000  47.74        1.0000       100.0%      3.2e-04          52.3            1.00\n"
        "W4A4_DYNAMIC      5.50          0.687  49.50        1.0369        98.0%        0.250          40.0            0.76\n"
    )


def test_every_column_is_defined():
    assert set(COLUMN_DEFINITIONS) == set(COLUMNS[1:])
