"""jobs.novelty: per run and over the runs, does the distance from the reward data see the hacked samples?"""

import pytest

from jobs.common import read_json
from tests.conftest import toy_pairs
from uprlhf.data.loaders import write_parquet
from uprlhf.rl.replay import REPLAY_SCHEMA, ReplayBuffer


def _replay(run, hacked_words: str) -> None:
    """Eight samples with gold. Samples 1, 3 and 5 are hacked (proxy high, gold low), are ``hacked_words`` and
    have u = 0; sample 7 the proxy and gold both like; the rest are the pairs' own kind of text, with u = 0.3."""
    buffer = ReplayBuffer(run / "replay")
    rows = {name: [] for name in REPLAY_SCHEMA.names if name != "step"}
    for i in range(8):
        hacked = i in (1, 3, 5)
        proxy, gold = (2.0 + i, -1.0 - i) if hacked else (-2.0 - i, 1.0 + i) if i != 7 else (9.0, 9.0)
        u = 0.0 if hacked else 0.3
        rows["sample"].append(i)
        rows["prompt"].append("the movie was")
        rows["response"].append(hacked_words if hacked else ["great and fun", "awful and dull", "lovely and bad", "boring and fun"][i // 2])
        rows["prompt_ids"].append([1, 2])
        rows["response_ids"].append([3, 4])
        rows["logprobs"].append([-0.5 - 0.1 * i, -0.5])
        rows["ref_logprobs"].append([-0.5, -0.5])
        rows["member_rewards"].append([proxy - u, proxy + u])
        rows["reward_mean"].append(proxy)
        rows["reward_std"].append(u)
        rows["penalized_reward"].append(proxy)
        rows["gold"].append(gold)
        rows["policy_version"].append(0)
        rows["policy_lag"].append(0)
        rows["ensemble_version"].append(0)
    buffer.append(0, rows)


@pytest.fixture()
def data_dir(tmp_path):
    data = tmp_path / "data"
    write_parquet(toy_pairs(40), data / "reward_train.parquet")
    write_parquet(toy_pairs(12, seed=3), data / "reward_test.parquet")
    write_parquet([{"id": f"o{i}", "prompt": "the movie was", "response": "zz qq xx " * (i + 1)} for i in range(6)], data / "ood.parquet")
    return data


def test_novelty_job_ranks_samples_unlike_the_reward_data_in_token_space(data_dir, tiny_reward_checkpoint, tiny_policy, tmp_path):
    from jobs.novelty import main

    runs = [tmp_path / "run0", tmp_path / "run1"]
    for run in runs:
        _replay(run, "zz qq zz qq zz qq")
    main([
        "--output-dir", str(tmp_path / "out"), f"data_dir={data_dir}", f"reward_checkpoint={tiny_reward_checkpoint}",
        f"runs=[{runs[0]}, {runs[1]}]", f"policy.name_or_path={tiny_policy}", "reward_max_length=24",
    ])
    result = read_json(tmp_path / "out" / "novelty.json")
    assert set(result["spaces"]) == {"reward_heads", "reward_backbone", "policy_backbone", "token_ngrams"}
    # words the pairs never hold: every hacked sample and every OOD response is farther than any other
    assert result["runs"][str(runs[0])]["token_ngrams"]["u_hacked_auroc"] == 1.0
    assert result["spaces"]["token_ngrams"]["ood_auroc"] == 1.0
    assert result["summary"]["token_ngrams"]["u_hacked_auroc"] == [1.0, 0.0]
    assert result["runs"][str(runs[0])]["token_ngrams"]["u_hacked_auroc_high_proxy"] == 1.0
    # beside the spaces, the runs' own u, lowest on the hacked samples
    assert result["runs"][str(runs[1])]["ensemble_u"]["u_hacked_auroc"] == 0.0
    for space in result["spaces"]:
        for value in result["summary"][space].values():
            assert value[0] is not None and value[1] == pytest.approx(0.0, abs=1e-9)


def test_a_run_without_a_replay_buffer_is_refused_before_any_model_loads(data_dir, tmp_path, capsys, monkeypatch):
    from jobs.novelty import main
    from uprlhf.rl import novelty

    monkeypatch.setattr(novelty.NOVELTY_SPACES, "get", lambda name: pytest.fail("a space was built"))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "ensemble.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", str(tmp_path / "out"), f"data_dir={data_dir}", f"reward_checkpoint={checkpoint}", f"runs=[{tmp_path / 'nothing'}]"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: runs[0]: {tmp_path / 'nothing' / 'replay'}: no replay buffer folder (a PPO run folder)"
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_a_checkpoint_folder_without_a_manifest_is_refused(data_dir, tmp_path, capsys):
    from jobs.novelty import main

    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path / "out"), f"data_dir={data_dir}", f"reward_checkpoint={tmp_path}", f"runs=[{tmp_path}]"])
    assert capsys.readouterr().err.strip() == f"error: reward_checkpoint: no ensemble.json in {tmp_path} (a jobs.train_reward checkpoint folder)"


def test_an_unknown_space_lists_the_registry(tmp_path, capsys):
    from jobs.novelty import main

    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path), "data_dir=d", "reward_checkpoint=c", "runs=[r]", "spaces=[pixels]"])
    err = capsys.readouterr().err
    assert "pixels" in err and "'reward_heads', 'reward_backbone', 'policy_backbone', 'token_ngrams'" in err
