"""jobs.novelty: per run and over the runs, does the distance from the reward data see the hacked samples?"""

import pytest

from jobs.common import read_json
from tests.conftest import tiny_rl_tree, toy_pairs
from uprlhf.config import RLConfig, to_yaml
from uprlhf.data.loaders import write_parquet
from uprlhf.rl.replay import REPLAY_SCHEMA, ReplayBuffer


def _run(run, tree: dict, hacked_words: str, u_clean: float) -> str:
    """A PPO run folder: its config (``tree``) and a replay buffer of nine samples. Samples 1, 3 and 5 are hacked
    (proxy high, gold low), are ``hacked_words`` and have u = 0; sample 7 the proxy and gold both like; sample 8
    has no gold (a step without evaluation); the rest are the pairs' own kind of text, with u = ``u_clean``."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(RLConfig.model_validate(tree)))
    rows = {name: [] for name in REPLAY_SCHEMA.names if name != "step"}
    clean = ["great and fun", "awful and dull", "lovely and bad", "boring and fun", "dull and lovely"]
    for i in range(9):
        hacked = i in (1, 3, 5)
        proxy, gold = (2.0 + i, -1.0 - i) if hacked else (-2.0 - i, 1.0 + i) if i != 7 else (9.0, 9.0)
        u = 0.0 if hacked else u_clean
        rows["sample"].append(i)
        rows["prompt"].append("the movie was")
        # sample 8, without gold, repeats the hacked words: it must be left out, and shift no text onto another row
        rows["response"].append(hacked_words if hacked or i == 8 else clean[i // 2])
        rows["prompt_ids"].append([1, 2])
        rows["response_ids"].append([3, 4])
        rows["logprobs"].append([-0.5 - 0.1 * i, -0.5])
        rows["ref_logprobs"].append([-0.5, -0.5])
        rows["member_rewards"].append([proxy - u, proxy + u])
        rows["reward_mean"].append(proxy)
        rows["reward_std"].append(u)
        rows["penalized_reward"].append(proxy)
        rows["gold"].append(None if i == 8 else gold)
        rows["policy_version"].append(0)
        rows["policy_lag"].append(0)
        rows["ensemble_version"].append(0)
    ReplayBuffer(run / "replay").append(0, rows)
    return str(run)


@pytest.fixture()
def data_dir(tmp_path):
    data = tmp_path / "data"
    write_parquet(toy_pairs(40), data / "reward_train.parquet")
    write_parquet(toy_pairs(12, seed=3), data / "reward_test.parquet")
    write_parquet([{"id": f"o{i}", "prompt": "the movie was", "response": "zz qq xx ! " * (i + 1)} for i in range(6)], data / "ood.parquet")
    return data


@pytest.fixture()
def tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, data_dir):
    return tiny_rl_tree(tiny_policy, tiny_reward_checkpoint, tiny_prompts, data_dir=str(data_dir), reward_max_length=24)


def test_novelty_job_ranks_samples_unlike_the_reward_data_in_token_space(tree, tmp_path):
    from jobs.novelty import main

    runs = [_run(tmp_path / "run0", tree, "zz qq zz qq !", 0.3), _run(tmp_path / "run1", tree, "xx ! xx ! xx", 0.0)]
    main(["--output-dir", str(tmp_path / "out"), f"runs=[{runs[0]}, {runs[1]}]"])
    result = read_json(tmp_path / "out" / "novelty.json")
    assert set(result["spaces"]) == {"reward_heads", "reward_backbone", "policy_backbone", "token_ngrams"}
    # words and marks the pairs never hold: every hacked sample and every OOD response is farther than any other
    for run in runs:
        assert result["runs"][run]["token_ngrams"]["u_hacked_auroc"] == 1.0
        assert result["runs"][run]["token_ngrams"]["u_hacked_auroc_high_proxy"] == 1.0
    assert result["spaces"]["token_ngrams"]["ood_auroc"] == 1.0
    assert result["summary"]["token_ngrams"]["u_hacked_auroc"] == [1.0, 0.0]
    # beside the spaces, the runs' own u: lowest on the hacked samples in run0, the same everywhere in run1
    assert result["runs"][runs[0]]["ensemble_u"]["u_hacked_auroc"] == 0.0
    assert result["runs"][runs[1]]["ensemble_u"]["u_hacked_auroc"] == 0.5
    assert result["summary"]["ensemble_u"]["u_hacked_auroc"] == [0.25, pytest.approx(0.5 ** 0.5 / 2)]
    for space in result["spaces"]:
        assert all(value[0] is not None for value in result["summary"][space].values())


def test_a_run_without_a_replay_buffer_is_refused_before_any_model_loads(tree, tmp_path, capsys, monkeypatch):
    from jobs.novelty import main
    from uprlhf.rl import novelty

    monkeypatch.setattr(novelty.NOVELTY_SPACES, "get", lambda name: pytest.fail("a space was built"))
    good = _run(tmp_path / "good", tree, "zz", 0.3)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.yaml").write_text(to_yaml(RLConfig.model_validate(tree)))
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path / "out"), f"runs=[{good}, {tmp_path / 'bare'}]"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: runs[1]: {tmp_path / 'bare' / 'replay'}: no replay buffer folder"
    assert not (tmp_path / "out").exists()


def test_runs_of_other_reward_data_are_refused(tree, tmp_path, capsys, data_dir):
    from jobs.novelty import main

    first = _run(tmp_path / "run0", tree, "zz", 0.3)
    other = _run(tmp_path / "run1", {**tree, "data_dir": str(tmp_path / "elsewhere")}, "zz", 0.3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path / "out"), f"runs=[{first}, {other}]"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: runs[1]: its data_dir is {tmp_path / 'elsewhere'}, runs[0]'s {data_dir}; one novelty job measures runs "
        "of one reward data, ensemble and policy"
    )


def test_reward_heads_on_an_ensemble_without_one_head_layer_is_refused(tree, tmp_path, capsys):
    import json

    from jobs.novelty import main

    checkpoint = tmp_path / "lora"
    checkpoint.mkdir()
    (checkpoint / "ensemble.json").write_text(json.dumps({"kind": "lora"}))
    run = _run(tmp_path / "run0", {**tree, "reward_checkpoint": str(checkpoint)}, "zz", 0.3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path / "out"), f"runs=[{run}]"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: spaces: 'reward_heads' needs an ensemble whose members are heads on one layer (linear, frozen_heads); "
        f"{checkpoint} is kind 'lora'"
    )


def test_unknown_and_repeated_entries_are_refused(tmp_path, capsys):
    from jobs.novelty import main

    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "runs=[r]", "spaces=[pixels]"])
    err = capsys.readouterr().err
    assert "pixels" in err and "'reward_heads', 'reward_backbone', 'policy_backbone', 'token_ngrams'" in err
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "runs=[r, s, r]"])
    assert "each entry once; repeated: r" in capsys.readouterr().err
