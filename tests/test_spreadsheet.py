"""A batch manifest saved by a spreadsheet (mam.spreadsheet): read as the training tables are."""

from __future__ import annotations

import codecs

import numpy as np
import pytest

from mam.batch.archive import InvalidManifestError, collect, parse_infant


def _excel(path, lines: list[str]) -> None:
    """As Excel's "CSV UTF-8" saves in a locale with a decimal comma: BOM and ';'."""
    path.write_bytes(codecs.BOM_UTF8 + ("\r\n".join(lines) + "\r\n").encode())


def test_an_excel_manifest_is_read_with_its_conventions_normalised(tmp_path, caplog):
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", np.zeros((300, 17, 3), np.float32))
    _excel(tmp_path / "m.csv", [
        "File;ID;Sex;Gestational_Age_Weeks;Birth_weight_g;Corrected_age_weeks",
        "a.npy;inf-1;F;34,5;2100;12,5",
        "b.npy; inf-2 ;M;;;",
    ])  # fmt: skip
    with caplog.at_level("WARNING"):
        items = collect(tmp_path / "m.csv")
    assert [i.id for i in items] == ["inf-1", "inf-2"]
    assert items[0].infant == {"sex": "female", "gestational_age_weeks": "34.5",
                               "birth_weight_g": "2100", "corrected_age_weeks": "12.5"}  # fmt: skip
    assert items[1].infant == {"sex": "male"}
    infant = parse_infant(items[0].infant)
    assert infant.gestational_age_weeks == 34.5 and infant.sex == "female"
    said = caplog.text
    for what in ("byte-order mark", "separator ';'", "decimal comma", "sex 'F' -> 'female'"):
        assert what in said
    assert "inf-1" not in said and "2100" not in said  # conventions, never a row's values


def test_every_bad_manifest_line_is_listed_at_once(tmp_path):
    _excel(tmp_path / "m.csv", ["file;id", "a.npy;x", ";y", "b.npy;x", "c.npy;z"])
    with pytest.raises(InvalidManifestError) as e:
        collect(tmp_path / "m.csv")
    msg = str(e.value)
    assert "2 problems" in msg and "line 3: empty 'file'" in msg
    assert "line 4: duplicate id (first on line 2)" in msg


def test_a_manifest_without_a_file_column_names_the_header(tmp_path):
    _excel(tmp_path / "m.csv", ["recording;id", "a.npy;x"])
    with pytest.raises(InvalidManifestError, match="no column 'file'"):
        collect(tmp_path / "m.csv")
