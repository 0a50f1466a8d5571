"""The ANHIR adapter on tiny tables written by the tests, including malformed input."""

from pathlib import Path

import numpy as np
import pytest

from bench.pairs import DatasetError, LandmarkError, load_table, read_landmarks, write_landmarks


def test_reads_table_paths_tissues_and_sizes(tiny_table: Path):
    pairs = load_table(tiny_table)
    assert [p.pair_id for p in pairs] == ["0", "1", "2"]
    assert [p.tissue for p in pairs] == ["kidney", "kidney", "lung-lesion"]
    assert all(p.source_image.exists() and p.target_landmarks.exists() for p in pairs)
    assert pairs[0].target_size == (180, 240)
    assert pairs[0].diagonal == pytest.approx(300.0)
    assert all(p.problem is None and p.scorable for p in pairs)


def test_extra_data_root_resolves_relative_paths(tmp_path: Path, tiny_table: Path):
    moved_table = tmp_path / "elsewhere" / "table.csv"
    moved_table.parent.mkdir()
    moved_table.write_text(tiny_table.read_text())
    pairs = load_table(moved_table, data_roots=[tiny_table.parent])
    assert all(p.source_image.exists() for p in pairs)


def test_pairs_without_target_landmarks_are_not_scorable(tmp_path: Path, tiny_table: Path):
    text = tiny_table.read_text().splitlines()
    cells = text[1].split(",")
    cells[4] = ""  # Target landmarks withheld, as in ANHIR's evaluation pairs
    text[1] = ",".join(cells)
    tiny_table.write_text("\n".join(text) + "\n")
    p = load_table(tiny_table)[0]
    assert p.target_landmarks is None and not p.scorable and p.problem is None


def test_missing_required_column_is_a_table_error(tmp_path: Path):
    t = tmp_path / "t.csv"
    t.write_text(",Source image,Source landmarks\n0,a.jpg,a.csv\n")
    with pytest.raises(DatasetError, match="missing column.*Target image"):
        load_table(t)


def test_missing_table_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DatasetError, match="not found"):
        load_table(tmp_path / "nope.csv")


def test_bad_size_string_is_a_row_problem(tiny_table: Path):
    tiny_table.write_text(tiny_table.read_text().replace('"(180, 240)"', '"180x240"', 1))
    pairs = load_table(tiny_table)
    assert "bad image size '180x240'" in pairs[0].problem
    assert pairs[1].problem is None


def test_landmark_roundtrip(tmp_path: Path):
    pts = np.array([[1.5, 2.25], [100.0, 0.0]])
    write_landmarks(tmp_path / "l.csv", pts)
    assert (tmp_path / "l.csv").read_text().splitlines()[0] == ",X,Y"
    np.testing.assert_array_equal(read_landmarks(tmp_path / "l.csv"), pts)


@pytest.mark.parametrize(
    "content,message",
    [
        (",A,B\n1,2,3\n", "bad landmark header"),
        (",X,Y\n1,nan,3\n", "non-finite"),
        (",X,Y\n1,-2,3\n", "negative coordinate"),
        (",X,Y\n1,abc,3\n", "cannot read coordinates"),
        (",X,Y\n", "no landmarks"),
        ("", "empty"),
    ],
)
def test_bad_landmark_files_name_file_and_problem(tmp_path: Path, content: str, message: str):
    f = tmp_path / "bad.csv"
    f.write_text(content)
    with pytest.raises(LandmarkError, match=message) as err:
        read_landmarks(f)
    assert str(f) in str(err.value) and "\n" not in str(err.value)


def test_warped_landmarks_may_be_negative(tmp_path: Path):
    f = tmp_path / "warped.csv"
    write_landmarks(f, np.array([[-3.0, 4.0]]))
    with pytest.raises(LandmarkError, match="negative"):
        read_landmarks(f)
    np.testing.assert_array_equal(read_landmarks(f, allow_negative=True), [[-3.0, 4.0]])


def test_bom_encoded_files_read_right(tmp_path: Path, tiny_table: Path):
    """Spreadsheet programs save CSV with a UTF-8 byte-order mark: it must not become part of a cell."""
    text = tiny_table.read_text().replace("\n0,", "\n100,").replace("\n1,", "\n101,")
    tiny_table.write_bytes("\ufeff".encode() + text.encode())
    assert [p.pair_id for p in load_table(tiny_table)] == ["100", "101", "2"]
    f = tmp_path / "bom.csv"
    f.write_bytes("\ufeff,X,Y\n1,2.5,3\n".encode())
    np.testing.assert_array_equal(read_landmarks(f), [[2.5, 3.0]])
