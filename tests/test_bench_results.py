"""bench/results_file.py: a rerun of some models replaces only their rows (`--update`),
and only in results of the same settings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
from results_file import merged_rows, write_results  # noqa: E402

META = {"torch": "2.9.1", "threads": 2, "quick": False}


def test_update_replaces_the_rerun_rows_in_place_and_appends_new_ones(tmp_path: Path) -> None:
    write_results(tmp_path, "t", META, [{"case": "a", "x": 1}, {"case": "b", "x": 2}, {"case": "c", "x": 3}], "table")
    rows = merged_rows(tmp_path, "t", META, [{"case": "d", "x": 40}, {"case": "b", "x": 20}])
    assert rows == [{"case": "a", "x": 1}, {"case": "b", "x": 20}, {"case": "c", "x": 3}, {"case": "d", "x": 40}]


def test_update_refuses_results_of_other_settings(tmp_path: Path) -> None:
    write_results(tmp_path, "t", META, [{"case": "a", "x": 1}], "table")
    with pytest.raises(SystemExit, match="other settings"):
        merged_rows(tmp_path, "t", {**META, "quick": True}, [{"case": "a", "x": 2}])
