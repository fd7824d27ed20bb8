"""uprlhf.paths: a data folder's files are found in any canonical format (DESIGN §4)."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uprlhf.data.loaders import DataError, load_prompts
from uprlhf.paths import DataPaths, RunPaths, data_paths

datasets.disable_progress_bars()
ROWS = [{"id": "a", "prompt": "the movie was"}, {"id": "b", "prompt": "this film is"}]


def write(folder, stem, fmt):
    folder.mkdir(parents=True, exist_ok=True)
    if fmt in ("jsonl", "json"):
        (folder / f"{stem}.{fmt}").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        (folder / f"{stem}.csv").write_text("id,prompt\n" + "".join(f"{r['id']},{r['prompt']}\n" for r in ROWS))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), folder / f"{stem}.parquet")
    else:
        datasets.Dataset.from_list(ROWS).save_to_disk(str(folder / stem))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "json", "csv", "dataset"])
def test_find_returns_the_one_file_of_a_stem_in_any_canonical_format(tmp_path, fmt):
    write(tmp_path, "rl_prompts", fmt)
    write(tmp_path, "ood", "csv")  # other stems do not get in the way
    found = DataPaths(tmp_path).find("rl_prompts")
    assert found.name == ("rl_prompts" if fmt == "dataset" else f"rl_prompts.{fmt}")
    assert [r["prompt"] for r in load_prompts(found).rows] == ["the movie was", "this film is"]


def test_find_names_the_expected_files_when_none_exists(tmp_path):
    with pytest.raises(DataError) as err:
        DataPaths(tmp_path).find("reward_test")
    assert err.value.problems == [
        f"{tmp_path}: no reward_test data; expected one of reward_test.parquet, reward_test.jsonl, "
        "reward_test.json, reward_test.csv or a saved datasets folder reward_test/"
    ]


def test_find_refuses_to_choose_between_several_files_of_a_stem(tmp_path):
    write(tmp_path, "reward_train", "parquet")
    write(tmp_path, "reward_train", "jsonl")
    write(tmp_path, "reward_train", "dataset")
    with pytest.raises(DataError) as err:
        DataPaths(tmp_path).find("reward_train")
    assert err.value.problems == [
        f"{tmp_path}: several reward_train data files (reward_train.parquet, reward_train.jsonl, reward_train/); keep one"
    ]


def test_find_in_a_missing_folder_says_so(tmp_path):
    with pytest.raises(DataError, match=r"no such data folder \(looked for rl_prompts\)"):
        data_paths(None, tmp_path).find("rl_prompts")
    assert data_paths(None, tmp_path) == RunPaths(tmp_path).data
