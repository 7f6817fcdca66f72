"""`exam-collector batches import|show|list` as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector.cli import main

from .conftest import INSTITUTION, VENUE

HEADER = "batch_id,institution,venue,occupation,level,part,room,start,end\n"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def config(tmp_path: Path, capsys) -> Path:
    path = tmp_path / "collector.toml"
    assert run(capsys, "--config", str(path), "init", "--data-dir", str(tmp_path / "data"))[0] == 0
    assert run(capsys, "--config", str(path), "db", "upgrade")[0] == 0
    return path


def test_import_show_list(config: Path, tmp_path: Path, capsys) -> None:
    csv_file = tmp_path / "批次.csv"
    csv_file.write_bytes((HEADER + f"B7,{INSTITUTION},{VENUE},电工,四级,theory,T101,2026-11-26 09:00,2026-11-26 11:00\n"
                          f"B7,{INSTITUTION},{VENUE},电工,四级,practical,P201,2026-11-26 13:00,2026-11-26 15:00\n")
                         .encode("gb18030"))
    code, out, err = run(capsys, "--config", str(config), "batches", "import", str(csv_file), "--actor", "op")
    assert code == 0, err
    assert "编码 gb18030" in out and "新建 1 个批次" in out
    # No camera has ever recorded in these rooms: both parts have no footage, which is a coverage gap (exit 3).
    code, out, err = run(capsys, "--config", str(config), "batches", "show", "B7")
    assert code == 3
    assert "批次 B7" in out and "理论知识考场 T101" in out and "操作技能考场 P201" in out
    assert "2026-11-26 09:00–11:00" in out and "无录像" in out
    code, out, err = run(capsys, "--config", str(config), "batches", "show", "B7", "--lang", "en")
    assert code == 3 and "theory room T101" in out and "no known camera" in out
    code, out, err = run(capsys, "--config", str(config), "batches", "show", "B7", "--json")
    data = json.loads(out)
    assert code == 3 and data["status"] == "no_footage"
    assert [(p["part"], p["start"], p["start_local"]) for p in data["parts"]] == [
        ("theory", "2026-11-26T01:00:00.000Z", "2026-11-26T09:00:00+08:00"),
        ("practical", "2026-11-26T05:00:00.000Z", "2026-11-26T13:00:00+08:00")]
    code, out, err = run(capsys, "--config", str(config), "batches", "list", "--json")
    assert code == 0 and [b["batch_id"] for b in json.loads(out)] == ["B7"]


def test_bad_file_lists_rows_then_one_error_line_exit_1(config: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + f"B8,{INSTITUTION},{VENUE},电工,四级,theory,T101,2026-11-26 11:00,2026-11-26 09:00\n"
                   f"B8,{INSTITUTION},{VENUE},电工,四级,oral,T102,2026-11-26 11:00,2026-11-26 12:00\n")
    code, out, err = run(capsys, "--config", str(config), "batches", "import", str(bad))
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[0].endswith("row 2, end: 2026-11-26 09:00 is not after start 2026-11-26 11:00")
    assert "row 3, part: 'oral' is not theory" in lines[1]
    assert lines[-1] == (f"exam-collector: error: {bad}: 2 problem(s), nothing imported; fix the rows listed above "
                         "and import the file again")
    code, out, err = run(capsys, "--config", str(config), "batches", "list")
    assert code == 0 and "尚未导入批次" in out
    code, out, err = run(capsys, "--config", str(config), "batches", "show", "B8")
    assert code == 1 and err.count("\n") == 1 and "not imported" in err
