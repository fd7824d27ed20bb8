import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import uprlhf.data.loaders as data
from uprlhf.data.loaders import (
    OPTIONAL_FIELDS,
    PREFERENCE_FIELDS,
    PROMPT_FIELDS,
    DataError,
    Loaded,
    load_preferences,
    load_prompts,
    write_parquet,
)

datasets.disable_progress_bars()

FORMATS = ["jsonl", "json", "parquet", "csv", "dataset"]
COLUMNAR = ["parquet", "dataset"]

ALLOWED = (
    ".jsonl or .json (JSON lines), .parquet, .csv (with a header row), "
    "or a folder saved with datasets.Dataset.save_to_disk"
)


def write(fmt: str, rows: list[dict], folder: Path, name: str = "data") -> Path:
    """Write ``rows`` as ``fmt``; None is an absent key in JSON lines, a null or an empty cell elsewhere."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if fmt in ("jsonl", "json"):
        path = folder / f"{name}.{fmt}"
        lines = [json.dumps({k: v for k, v in row.items() if v is not None}) + "\n" for row in rows]
        path.write_text("".join(lines), encoding="utf-8")
    elif fmt == "csv":
        path = folder / f"{name}.csv"
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    elif fmt == "parquet":
        path = folder / f"{name}.parquet"
        pq.write_table(pa.table({c: [row.get(c) for row in rows] for c in columns}), path)
    else:
        path = folder / name
        datasets.Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns}).save_to_disk(str(path))
    return path


def problems_of(load, path: Path, **kwargs) -> list[str]:
    with pytest.raises(DataError) as caught:
        load(path, **kwargs)
    return caught.value.problems


def test_public_field_names():
    assert PROMPT_FIELDS == ("prompt",)
    assert PREFERENCE_FIELDS == ("prompt", "chosen", "rejected")
    assert OPTIONAL_FIELDS == ("id", "subtask")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_the_same_canonical_preference_rows(tmp_path, fmt):
    rows = [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1", "id": "a", "subtask": "math", "source": "x"},
        {"prompt": "p2", "chosen": "c2", "rejected": "r2", "id": None, "subtask": None, "source": "y"},
    ]
    loaded = load_preferences(write(fmt, rows, tmp_path))
    assert loaded == Loaded(
        rows=[
            {"prompt": "p1", "chosen": "c1", "rejected": "r1", "id": "a", "subtask": "math"},
            {"prompt": "p2", "chosen": "c2", "rejected": "r2", "id": "2", "subtask": "default"},
        ],
        skipped=0,
        problems=[],
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_prompts_without_id_or_subtask_get_row_number_and_default(tmp_path, fmt):
    loaded = load_prompts(write(fmt, [{"prompt": "first"}, {"prompt": "second"}], tmp_path))
    assert loaded.rows == [
        {"prompt": "first", "id": "1", "subtask": "default"},
        {"prompt": "second", "id": "2", "subtask": "default"},
    ]


def test_jsonl_default_id_is_the_line_number(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": ""}\n{"prompt": "c"}\n')
    assert load_prompts(path, skip_bad=True).rows == [
        {"prompt": "a", "id": "1", "subtask": "default"},
        {"prompt": "c", "id": "3", "subtask": "default"},
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "dataset"])
def test_int_ids_become_strings(tmp_path, fmt):
    path = write(fmt, [{"prompt": "a", "id": 7}, {"prompt": "b", "id": 0}], tmp_path)
    assert [row["id"] for row in load_prompts(path).rows] == ["7", "0"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_extra_columns_are_ignored(tmp_path, fmt):
    path = write(fmt, [{"extra": "e", "prompt": "a", "note": "n"}], tmp_path)
    assert load_prompts(path).rows == [{"prompt": "a", "id": "1", "subtask": "default"}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_required_fields_are_reported_per_row(tmp_path, fmt):
    path = write(fmt, [{"prompt": "a"}, {"prompt": "b"}], tmp_path)
    assert problems_of(load_preferences, path) == [
        f"{path}:1: chosen: missing",
        f"{path}:1: rejected: missing",
        f"{path}:2: chosen: missing",
        f"{path}:2: rejected: missing",
    ]


def test_jsonl_missing_field_in_one_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "c", "rejected": "r"}\n{"prompt": "b", "chosen": "c"}\n')
    assert problems_of(load_preferences, path) == [f"{path}:2: rejected: missing"]


def test_csv_short_row_reports_cell_count_and_missing_field(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nd,e\n")
    assert problems_of(load_preferences, path) == [
        f"{path}:2: row: expected 3 cells, got 2",
        f"{path}:2: rejected: missing",
    ]


def test_csv_row_with_more_cells_than_header_is_reported(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\na\nb,extra\n")
    assert problems_of(load_prompts, path) == [f"{path}:2: row: expected 1 cells, got 2"]


def test_jsonl_wrong_types_name_the_type(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": 5, "chosen": [1], "rejected": None},
        {"prompt": 1.5, "chosen": {"a": 1}, "rejected": True},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert problems_of(load_preferences, path) == [
        f"{path}:1: prompt: expected a string, got int",
        f"{path}:1: chosen: expected a string, got list",
        f"{path}:1: rejected: expected a string, got null",
        f"{path}:2: prompt: expected a string, got float",
        f"{path}:2: chosen: expected a string, got dict",
        f"{path}:2: rejected: expected a string, got bool",
    ]


@pytest.mark.parametrize("fmt", COLUMNAR)
def test_columnar_wrong_type_and_null_are_reported(tmp_path, fmt):
    rows = [{"prompt": "a", "chosen": 3, "rejected": "r"}, {"prompt": None, "chosen": 4, "rejected": "r"}]
    path = write(fmt, rows, tmp_path)
    assert problems_of(load_preferences, path) == [
        f"{path}:1: chosen: expected a string, got int",
        f"{path}:2: prompt: expected a string, got null",
        f"{path}:2: chosen: expected a string, got int",
    ]


def test_jsonl_wrong_optional_field_types_are_reported(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "a", "id": 1.5},
        {"prompt": "b", "id": True, "subtask": 3},
        {"prompt": "c", "id": [1]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert problems_of(load_prompts, path) == [
        f"{path}:1: id: expected a string or int, got float",
        f"{path}:2: id: expected a string or int, got bool",
        f"{path}:2: subtask: expected a string, got int",
        f"{path}:3: id: expected a string or int, got list",
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_and_whitespace_text_is_reported(tmp_path, fmt):
    rows = [
        {"prompt": "", "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": " \t ", "rejected": "\n"},
    ]
    path = write(fmt, rows, tmp_path)
    assert problems_of(load_preferences, path) == [
        f"{path}:1: prompt: empty",
        f"{path}:2: chosen: empty",
        f"{path}:2: rejected: empty",
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_identical_chosen_and_rejected_after_strip_is_reported(tmp_path, fmt):
    rows = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": " same\n", "rejected": "same"},
    ]
    path = write(fmt, rows, tmp_path)
    assert problems_of(load_preferences, path) == [
        f"{path}:1: chosen: identical to rejected",
        f"{path}:2: chosen: identical to rejected",
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_over_max_chars_is_reported_with_its_length(tmp_path, fmt):
    path = write(fmt, [{"prompt": "12345"}, {"prompt": "123456"}, {"prompt": "éééééééé"}], tmp_path)
    assert problems_of(load_prompts, path, max_chars=5) == [
        f"{path}:2: prompt: longer than 5 characters (6)",
        f"{path}:3: prompt: longer than 5 characters (8)",
    ]


def test_default_max_chars_is_4000(tmp_path):
    path = write("jsonl", [{"prompt": "x" * 4000}, {"prompt": "x" * 4001}], tmp_path)
    assert problems_of(load_prompts, path) == [f"{path}:2: prompt: longer than 4000 characters (4001)"]


def test_jsonl_invalid_utf8_names_the_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'{"prompt": "ok", "chosen": "c", "rejected": "r"}\n'
        b'{"prompt": "bad \xff", "chosen": "c", "rejected": "r\xc3"}\n'
        b'{"prompt": "ok", "chosen": "c", "rejected": "r", "extra": "\xfe"}\n'
    )
    assert problems_of(load_preferences, path) == [
        f"{path}:2: prompt: not valid UTF-8",
        f"{path}:2: rejected: not valid UTF-8",
        f"{path}:3: extra: not valid UTF-8",
    ]


def test_jsonl_invalid_utf8_that_no_field_holds_is_reported_for_the_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a", "meta": ["\xff"]}\n{"prompt": \xff\n{"\xfe": 1, "prompt": "b"}\n')
    assert problems_of(load_prompts, path) == [
        f"{path}:1: row: not valid UTF-8",
        f"{path}:2: row: not valid UTF-8",
        f"{path}:2: row: not a JSON object: Expecting value (column 12)",
        f"{path}:3: row: not valid UTF-8",
    ]


def test_csv_invalid_utf8_names_the_data_row_and_field(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(
        b"prompt,chosen,rejected,extra\n"
        b"a,b,c,d\n"
        b'"multi\nline",b,c,d\n'
        b"x\xff,b,c\xfe,d\n"
        b"y,b,c,\xfd\n"
    )
    assert problems_of(load_preferences, path) == [
        f"{path}:3: prompt: not valid UTF-8",
        f"{path}:3: rejected: not valid UTF-8",
        f"{path}:4: extra: not valid UTF-8",
    ]


def test_csv_invalid_utf8_in_header_is_reported(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt,\xff\na,b\n")
    assert problems_of(load_prompts, path) == [f"{path}: header: not valid UTF-8"]


@pytest.mark.parametrize("fmt", COLUMNAR)
def test_binary_column_with_invalid_utf8_is_reported(tmp_path, fmt):
    rows = [{"prompt": "good".encode()}, {"prompt": b"bad \xff"}, {"prompt": "é".encode()}]
    path = write(fmt, rows, tmp_path)
    assert problems_of(load_prompts, path) == [f"{path}:2: prompt: not valid UTF-8"]
    assert load_prompts(path, skip_bad=True).rows == [
        {"prompt": "good", "id": "1", "subtask": "default"},
        {"prompt": "é", "id": "3", "subtask": "default"},
    ]


def test_jsonl_lines_that_are_not_json_objects_are_reported(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n[1, 2]\n"text"\nnot json\n')
    assert problems_of(load_prompts, path) == [
        f"{path}:2: row: not a JSON object: Expecting value (column 12)",
        f"{path}:3: row: not a JSON object: got list",
        f"{path}:4: row: not a JSON object: got str",
        f"{path}:5: row: not a JSON object: Expecting value (column 1)",
    ]


def test_jsonl_blank_line_in_the_middle_is_reported(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b"}\n\n')
    assert problems_of(load_prompts, path) == [
        f"{path}:2: row: empty line",
        f"{path}:3: row: empty line",
        f"{path}:5: row: empty line",
    ]


def test_jsonl_trailing_newline_is_optional(tmp_path):
    with_newline, without_newline = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with_newline.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    without_newline.write_text('{"prompt": "a"}\n{"prompt": "b"}')
    assert load_prompts(with_newline).rows == load_prompts(without_newline).rows
    assert len(load_prompts(with_newline).rows) == 2


def test_jsonl_with_crlf_and_bom_loads(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    assert [row["prompt"] for row in load_prompts(path).rows] == ["a", "b"]


def test_csv_blank_line_is_reported_and_keeps_row_numbers(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\na\n\n\n")
    assert problems_of(load_prompts, path) == [f"{path}:2: row: empty line", f"{path}:3: row: empty line"]


def test_csv_with_bom_and_empty_optional_cells_loads(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,id,subtask\r\na,,\r\nb,x7,math\r\n")
    assert load_prompts(path).rows == [
        {"prompt": "a", "id": "1", "subtask": "default"},
        {"prompt": "b", "id": "x7", "subtask": "math"},
    ]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n \n"),
        ("empty.json", b""),
        ("empty.csv", b""),
        ("header.csv", b"prompt,id\n"),
    ],
)
def test_text_file_without_rows_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert problems_of(load_prompts, path) == [f"{path}: no rows"]
    assert problems_of(load_prompts, path, skip_bad=True) == [f"{path}: no rows"]


def test_parquet_without_rows_is_an_error(tmp_path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
    assert problems_of(load_prompts, path) == [f"{path}: no rows"]


def test_saved_dataset_without_rows_is_an_error(tmp_path):
    path = tmp_path / "empty"
    datasets.Dataset.from_dict({"prompt": ["a"]}).filter(lambda row: False).save_to_disk(str(path))
    assert problems_of(load_prompts, path) == [f"{path}: no rows"]


@pytest.mark.parametrize("name", ["data.txt", "data.tsv", "data"])
def test_unknown_extension_names_the_file_and_allowed_formats(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"prompt": "a"}\n')
    assert problems_of(load_prompts, path) == [f"{path}: unsupported format; allowed: {ALLOWED}"]


def test_extension_is_case_insensitive(tmp_path):
    path = tmp_path / "DATA.JSONL"
    path.write_text('{"prompt": "a"}\n')
    assert load_prompts(path).rows == [{"prompt": "a", "id": "1", "subtask": "default"}]


def test_missing_file_is_an_error(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert problems_of(load_prompts, path) == [f"{path}: no such file or folder"]


def test_folder_that_is_not_a_saved_dataset_is_an_error(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n')
    assert problems_of(load_prompts, tmp_path) == [
        f"{tmp_path}: not a folder saved with datasets.Dataset.save_to_disk; allowed: {ALLOWED}"
    ]


def test_saved_dataset_dict_is_an_error(tmp_path):
    path = tmp_path / "splits"
    split = datasets.Dataset.from_dict({"prompt": ["a"]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(path))
    assert problems_of(load_prompts, path) == [
        f"{path}: holds splits ['test', 'train']; save one split with Dataset.save_to_disk"
    ]


def test_unreadable_parquet_is_an_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    problems = problems_of(load_prompts, path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: not a readable Parquet file (")


def _damaged_parquet(tmp_path: Path, damage: str) -> Path:
    """An uncompressed one-column Parquet file with 8 bytes overwritten: its footer stays readable."""
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt number {i} " * 3 for i in range(200)]}), path, compression="none")
    raw = bytearray(path.read_bytes())
    # The first page header, or the 4-byte length in front of a value in the middle of the page.
    offset = 10 if damage == "page header" else raw.index(b"prompt number 100 ") - 4
    raw[offset : offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("damage", ["page header", "page data"])
def test_parquet_with_a_corrupt_page_is_a_data_error_naming_the_file(tmp_path, damage):
    path = _damaged_parquet(tmp_path, damage)
    assert pq.ParquetFile(path).metadata.num_rows == 200  # opens fine; the damage shows only when read
    problems = problems_of(load_prompts, path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: not a readable Parquet file (")
    assert problems[0].endswith(")") and "\n" not in problems[0]


def test_parquet_string_column_with_bytes_that_are_not_utf8_names_the_row(tmp_path):
    path = tmp_path / "bad_utf8.parquet"
    pq.write_table(pa.table({"prompt": ["fine", "also fine " * 4]}), path, compression="none")
    raw = path.read_bytes()
    at = raw.index(b"also fine")
    path.write_bytes(raw[:at] + b"\xff\xfe" + raw[at + 2 :])
    assert problems_of(load_prompts, path) == [f"{path}:2: prompt: not valid UTF-8"]


def test_all_problems_are_reported_not_just_the_first(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "ok", "chosen": "c", "rejected": "r"},
        {"chosen": "", "rejected": 1},
        {"prompt": "ok", "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": "x", "rejected": "x", "subtask": 2},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "oops\n")
    with pytest.raises(DataError) as caught:
        load_preferences(path)
    expected = [
        f"{path}:2: prompt: missing",
        f"{path}:2: chosen: empty",
        f"{path}:2: rejected: expected a string, got int",
        f"{path}:4: chosen: identical to rejected",
        f"{path}:4: subtask: expected a string, got int",
        f"{path}:5: row: not a JSON object: Expecting value (column 1)",
    ]
    assert caught.value.problems == expected
    assert str(caught.value) == "\n".join(expected)
    assert isinstance(caught.value, ValueError)


def test_data_error_lists_at_most_50_problems(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join('{"prompt": ""}\n' for _ in range(53)))
    with pytest.raises(DataError) as caught:
        load_prompts(path)
    assert len(caught.value.problems) == 53
    lines = str(caught.value).split("\n")
    assert lines[:50] == [f"{path}:{n}: prompt: empty" for n in range(1, 51)]
    assert lines[50:] == ["... and 3 more"]


def test_data_error_with_exactly_50_problems_has_no_trailer():
    assert str(DataError([f"p{n}" for n in range(50)])).split("\n") == [f"p{n}" for n in range(50)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_skip_bad_keeps_good_rows_and_counts_the_rest(tmp_path, fmt):
    rows = [
        {"prompt": "p1", "chosen": "c", "rejected": "r"},
        {"prompt": "", "chosen": "c", "rejected": "r"},
        {"prompt": "p3", "chosen": "same", "rejected": "same"},
        {"prompt": "p4", "chosen": "c", "rejected": "r"},
    ]
    path = write(fmt, rows, tmp_path)
    loaded = load_preferences(path, skip_bad=True)
    assert loaded == Loaded(
        rows=[
            {"prompt": "p1", "chosen": "c", "rejected": "r", "id": "1", "subtask": "default"},
            {"prompt": "p4", "chosen": "c", "rejected": "r", "id": "4", "subtask": "default"},
        ],
        skipped=2,
        problems=[f"{path}:2: prompt: empty", f"{path}:3: chosen: identical to rejected"],
    )


def test_skip_bad_counts_a_row_with_several_problems_once(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "c", "rejected": "r"}\n{"prompt": 1, "chosen": null}\n')
    loaded = load_preferences(path, skip_bad=True)
    assert loaded.skipped == 1
    assert loaded.problems == [
        f"{path}:2: prompt: expected a string, got int",
        f"{path}:2: chosen: expected a string, got null",
        f"{path}:2: rejected: missing",
    ]


def test_skip_bad_raises_when_no_row_remains(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": ""}\n{"text": "a"}\n')
    assert problems_of(load_prompts, path, skip_bad=True) == [
        f"{path}:1: prompt: empty",
        f"{path}:2: prompt: missing",
        f"{path}: no valid rows (2 skipped)",
    ]


def test_load_accepts_str_paths(tmp_path):
    path = write("jsonl", [{"prompt": "a"}], tmp_path)
    assert load_prompts(str(path)).rows == [{"prompt": "a", "id": "1", "subtask": "default"}]


def test_write_parquet_round_trips_and_leaves_no_temp_file(tmp_path):
    rows = [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1", "id": "a", "subtask": "math"},
        {"prompt": "p2", "chosen": "c2", "rejected": "r2", "id": "2", "subtask": "default"},
    ]
    path = tmp_path / "out" / "prefs.parquet"
    write_parquet(rows, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["prefs.parquet"]
    assert pq.read_table(path).to_pylist() == rows
    assert load_preferences(path).rows == rows


def test_write_parquet_replaces_an_existing_file(tmp_path):
    path = tmp_path / "p.parquet"
    write_parquet([{"prompt": "old"}], path)
    write_parquet([{"prompt": "new"}], str(path))
    assert pq.read_table(path).to_pylist() == [{"prompt": "new"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]


def test_write_parquet_keeps_keys_missing_from_the_first_row(tmp_path):
    path = tmp_path / "p.parquet"
    write_parquet([{"prompt": "a"}, {"prompt": "b", "subtask": "s"}], path)
    assert pq.read_table(path).to_pylist() == [
        {"prompt": "a", "subtask": None},
        {"prompt": "b", "subtask": "s"},
    ]


def test_failed_write_parquet_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "p.parquet"
    write_parquet([{"prompt": "old"}], path)

    def fail(table, where):
        where.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(data.pq, "write_table", fail)
    with pytest.raises(OSError, match="disk full"):
        write_parquet([{"prompt": "new"}], path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]
    assert pq.read_table(path).to_pylist() == [{"prompt": "old"}]


def test_responses_schema_loads_prompt_and_response(tmp_path):
    from uprlhf.data.loaders import load_responses

    path = tmp_path / "ood.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": ""}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_responses(path)
    assert str(err.value) == f"{path}:2: response: empty"
    assert load_responses(path, skip_bad=True).rows == [{"prompt": "p", "response": "r", "id": "1", "subtask": "default"}]
