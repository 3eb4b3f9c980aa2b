"""Reading scaling measurements from CSV: column discovery, suffixes, and errors that name
the file, the column and the line."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.core.errors import ConfigError, DataError
from lmforge.scaling.table import make_table, parse_columns, parse_number, read_table


def _write(tmp_path, text: str, name: str = "runs.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_default_column_names_and_fills_compute(tmp_path):
    path = _write(tmp_path, "# measured on the demo corpus\nN,D,loss\n1e7,2e8,4.1\n\n2e7,4e8,3.9\n")
    table = read_table(path)
    assert len(table) == 2
    np.testing.assert_allclose(table.params, [1e7, 2e7])
    np.testing.assert_allclose(table.compute, 6 * table.params * table.tokens)
    assert not table.compute_given and table.unique_tokens is None
    assert table.columns == {"params": "N", "tokens": "D", "loss": "loss"}


def test_aliases_case_and_suffixes(tmp_path):
    path = _write(tmp_path, "Params,Tokens,Final_Loss,FLOPs,unique_tokens,run\n"
                            "70M,1.4B,3.5,6e17,1B,a\n1.5B,300B,2.4,2.7e21,100B,b\n")
    table = read_table(path)
    np.testing.assert_allclose(table.params, [7e7, 1.5e9])
    np.testing.assert_allclose(table.tokens, [1.4e9, 3e11])
    np.testing.assert_allclose(table.compute, [6e17, 2.7e21])
    np.testing.assert_allclose(table.unique_tokens, [1e9, 1e11])
    assert table.compute_given and list(table.run) == ["a", "b"]


def test_explicit_columns(tmp_path):
    path = _write(tmp_path, "n_active,seen,val\n1e7,2e8,4.1\n2e7,4e8,3.9\n")
    table = read_table(path, parse_columns("params=n_active, tokens=seen,loss=val"))
    np.testing.assert_allclose(table.loss, [4.1, 3.9])


def test_parse_number():
    assert parse_number("1.4B") == 1.4e9
    assert parse_number("2t") == 2e12
    assert parse_number("1_000") == 1000
    assert parse_number("3e5") == 3e5
    with pytest.raises(ValueError):
        parse_number("B")


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("N,D,loss\n", "header only"),
    ("N,tokens,accuracy\n1,2,3\n", "no loss column"),
    ("N,D,loss\n1e7,2e8,4.1\n1e7,abc,4.0\n", "line 3, column 'D': expected a number, got 'abc'"),
    ("N,D,loss\n1e7,2e8,-4.1\n", "line 2, column 'loss': expected a positive finite number"),
    ("N,D,loss\n1e7,2e8,nan\n", "line 2, column 'loss': expected a positive finite number"),
    ("N,D,loss\n1e7,2e8\n", "line 2 has 2 fields, the header has 3"),
])
def test_bad_csv_errors_name_the_problem(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(DataError) as info:
        read_table(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_and_unknown_mapped_column(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_table(tmp_path / "nope.csv")
    path = _write(tmp_path, "N,D,loss\n1,2,3\n")
    with pytest.raises(DataError, match="column 'val_loss' \\(for loss\\) not found; the header has: N, D, loss"):
        read_table(path, {"loss": "val_loss"})
    with pytest.raises(DataError, match="used for both"):
        read_table(path, {"tokens": "N"})


def test_bad_columns_option():
    with pytest.raises(ConfigError, match="unknown key 'lost'"):
        parse_columns("lost=val")
    with pytest.raises(ConfigError, match="expected KEY=COLUMN"):
        parse_columns("loss")


def test_make_table_checks_values():
    with pytest.raises(DataError, match="column params, row 1"):
        make_table([1.0, 0.0], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(DataError, match="column tokens has 1 values"):
        make_table([1.0, 2.0], [1.0], [1.0, 1.0])
    table = make_table([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0])
    resampled = table.take(np.array([2, 2, 0]))
    np.testing.assert_allclose(resampled.params, [3.0, 3.0, 1.0])
