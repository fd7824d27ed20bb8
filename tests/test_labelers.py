import contextlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import pytest

from uprlhf.config import ConfigError, RLConfig, load_config
from uprlhf.data.gold import GoldScorer, TextBlobGold, VaderGold
from uprlhf.selection.config import GoldLabelerConfig, HumanLabelerConfig, LLMJudgeLabelerConfig, SelectorConfig
from uprlhf.selection.labelers import (
    LABELERS,
    GoldLabeler,
    HumanLabeler,
    JudgeLabeler,
    build_labeler,
    check_judge_url,
    parse_judge_score,
)

KEY_ENV = "UPRLHF_TEST_JUDGE_KEY"
SECRET = "sk-test-7f3a9c1e-do-not-log"
STALL_S = 1.0


class FixedGold(GoldScorer):
    """A gold scorer whose score is the response parsed as a float, for exact quintiles."""

    name = "fixed"

    def sentiment(self, text: str) -> float:
        raise AssertionError("score() is overridden")

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(r) for r in responses]


def gold_label(scores: list[float]) -> list[int | None]:
    ids = [str(i) for i in range(len(scores))]
    return GoldLabeler(FixedGold()).label(ids, ["p"] * len(scores), [repr(s) for s in scores])


# --- registry and config ---------------------------------------------------


def test_registry_holds_exactly_the_config_labeler_kinds():
    assert LABELERS.names() == ("gold", "llm_judge", "human")
    kinds = {name: LABELERS.get(name).config_type for name in LABELERS}
    assert kinds == {"gold": GoldLabelerConfig, "llm_judge": LLMJudgeLabelerConfig, "human": HumanLabelerConfig}
    for name, config_type in kinds.items():
        assert type(SelectorConfig(labeler={"name": name, "base_url": "http://h/v1", "model": "m"} if name == "llm_judge" else {"name": name}).labeler) is config_type


def test_labeler_config_is_one_type_per_kind_and_gold_by_default():
    assert SelectorConfig().labeler == GoldLabelerConfig()
    assert SelectorConfig(labeler={"gold": "textblob"}).labeler == GoldLabelerConfig(gold="textblob")  # name may be left out
    human = SelectorConfig(labeler={"name": "human", "wait_s": 7}).labeler
    assert isinstance(human, HumanLabelerConfig) and human.wait_s == 7


def test_a_field_of_another_labeler_is_rejected_in_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(RLConfig, None, ["selector.labeler={name: llm_judge, base_url: 'http://h/v1', model: m, wait_s: 5}"])
    message = str(err.value)
    assert message.count("\n") == 0
    assert "selector.labeler.wait_s: unknown field (for labeler name=llm_judge); allowed: api_key_env, backoff_s, base_url" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("selector.labeler.name=oracle", "selector.labeler.name = 'oracle': unknown labeler 'oracle'; allowed: 'gold', 'llm_judge', 'human'"),
        ("selector.labeler.name=llm_judge", "selector.labeler.base_url: required (for labeler name=llm_judge)"),
        ("selector.labeler.gold=oracle", "selector.labeler.gold = 'oracle': unknown gold scorer 'oracle'; allowed: 'vader', 'textblob', 'learned'"),
    ],
)
def test_bad_labeler_configs_name_the_field(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(RLConfig, None, [override])


def test_build_labeler_takes_the_labelers_own_config_type(tmp_path):
    with pytest.raises(TypeError, match="takes a GoldLabelerConfig"):
        build_labeler(HumanLabelerConfig().model_copy(update={"name": "gold"}), tmp_path)
    gold = build_labeler(GoldLabelerConfig(gold="textblob"), tmp_path)
    assert isinstance(gold.scorer, TextBlobGold)


def test_build_labeler_builds_each_kind_from_its_config(tmp_path):
    gold = build_labeler(GoldLabelerConfig(), tmp_path)
    assert isinstance(gold, GoldLabeler) and isinstance(gold.scorer, VaderGold)

    cfg = LLMJudgeLabelerConfig(
        base_url="http://127.0.0.1:9/v1/", model="m", api_key_env=KEY_ENV,
        timeout_s=2.5, max_retries=4, backoff_s=0.5,
    )
    judge = build_labeler(cfg, tmp_path)
    assert isinstance(judge, JudgeLabeler)
    assert (judge.url, judge.model, judge.api_key_env) == ("http://127.0.0.1:9/v1/chat/completions", "m", KEY_ENV)
    assert (judge.timeout_s, judge.max_retries, judge.backoff_s) == (2.5, 4, 0.5)

    human = build_labeler(HumanLabelerConfig(wait_s=7, poll_s=0.5), tmp_path)
    assert isinstance(human, HumanLabeler)
    assert (human.queue_dir, human.wait_s, human.poll_s) == (tmp_path / "labels", 7, 0.5)
    elsewhere = build_labeler(HumanLabelerConfig(queue_dir=str(tmp_path / "q")), tmp_path)
    assert elsewhere.queue_dir == tmp_path / "q"


def test_label_rejects_mismatched_lengths_and_repeated_ids():
    labeler = GoldLabeler(FixedGold())
    with pytest.raises(ValueError, match="2 ids, 1 prompts, 2 responses"):
        labeler.label(["a", "b"], ["p"], ["1", "2"])
    with pytest.raises(ValueError, match="unique"):
        labeler.label(["a", "a"], ["p", "p"], ["1", "2"])


def test_every_labeler_returns_nothing_for_an_empty_batch(tmp_path):
    assert GoldLabeler(FixedGold()).label([], [], []) == []
    assert HumanLabeler(tmp_path, wait_s=0).label([], [], []) == []
    assert JudgeLabeler("http://127.0.0.1:9", "m").label([], [], []) == []
    assert not tmp_path.joinpath("queue-0001.jsonl").exists()


# --- gold ------------------------------------------------------------------


def test_gold_labels_are_the_quintiles_of_the_batch():
    scores = [0.9, -1.2, 0.4, 0.1, -0.3, 0.7, -0.8, 0.2, 0.5, -0.1]
    # ascending: -1.2 -0.8 | -0.3 -0.1 | 0.1 0.2 | 0.4 0.5 | 0.7 0.9
    assert gold_label(scores) == [5, 1, 4, 3, 2, 5, 1, 3, 4, 2]


def test_gold_labels_rise_with_the_gold_score_and_use_each_label_equally():
    rng = random.Random(0)
    scores = [rng.uniform(-2, 1) for _ in range(50)]
    labeler = GoldLabeler(FixedGold())
    labels = labeler.label([str(i) for i in range(50)], ["p"] * 50, [repr(s) for s in scores])
    by_score = [label for _, label in sorted(zip(scores, labels))]
    assert by_score == sorted(by_score)
    assert [labels.count(level) for level in range(1, 6)] == [10] * 5
    assert labeler.stats == {"labelled": 50}


def test_gold_ties_share_a_label_and_a_single_item_gets_the_middle():
    assert gold_label([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]) == [1, 1, 3, 3, 3, 3, 4, 4, 5, 5]
    assert gold_label([0.3]) == [3]
    assert gold_label([0.3] * 4) == [3] * 4


def test_gold_labeler_with_vader_ranks_praise_above_complaint(tmp_path):
    responses = [
        "a truly wonderful, moving and brilliant film",
        "a dull, boring and awful mess of a film",
        "a film with some good scenes and some weak ones",
    ]
    labeler = build_labeler(GoldLabelerConfig(), tmp_path)
    labels = labeler.label(["a", "b", "c"], ["the movie was"] * 3, responses)
    assert labels[0] > labels[2] > labels[1]


# --- llm_judge: parsing ----------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("Score: 4", 4),
        ("score:5\n", 5),
        ("**Score:** 2", 2),
        ("The response is fine.\nScore: 3/5", 3),
        ("Score: 1. It is gibberish. Score: 5", 1),
        ("4", 4),
        (" **5** ", 5),
        ("3.", 3),
        ("I cannot say", None),
        ("Score: 0", None),
        ("Score: 45", None),
        ("Score: 4.5", None),
        ("6", None),
        ("It is a 4 out of 5", None),
        ("", None),
    ],
)
def test_parse_judge_score_takes_first_score_or_a_lone_digit(reply, label):
    assert parse_judge_score(reply) == label


# --- llm_judge: against a loopback stub server ------------------------------


class StubJudge(BaseHTTPRequestHandler):
    """An OpenAI-style chat endpoint whose behaviour is picked by the response being judged.

    good: "Score: 4"; garbage: "I cannot say"; stall: sleeps past the client's
    timeout; flaky: 500 twice, then "Score: 2"; rate_limited: 429 once, then
    "Score: 3"; down: always 503; forbidden: 401 whose body echoes the key;
    redirect: 307 to ``server.redirect_to`` + the same path.
    """

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = re.search(r"Response:\n<<<\n(.*?)\n>>>", body["messages"][-1]["content"], re.S)[1]
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body, "mode": mode})
            seen = sum(r["mode"] == mode for r in self.server.requests)
        if mode == "good":
            self.reply(200, chat("Score: 4"))
        elif mode == "garbage":
            self.reply(200, chat("I cannot say"))
        elif mode == "stall":
            time.sleep(STALL_S)
            self.reply(200, chat("Score: 5"))
        elif mode == "flaky" and seen <= 2:
            self.reply(500, {"error": "overloaded"})
        elif mode == "flaky":
            self.reply(200, chat("Score: 2"))
        elif mode == "rate_limited" and seen <= 1:
            self.reply(429, {"error": "slow down"})
        elif mode == "rate_limited":
            self.reply(200, chat("Score: 3"))
        elif mode == "down":
            self.reply(503, {"error": "unavailable"})
        elif mode == "redirect":
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.send_response(307)
                self.send_header("Location", self.server.redirect_to + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
        elif mode == "forbidden":
            self.reply(401, {"error": f"Incorrect API key provided: {self.headers.get('Authorization')}"})

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a stalled reply: the client already hung up
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the tests read what the server saw from its records, not from stderr."""


def chat(content: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


def start_stub() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    server.requests = []
    server.lock = threading.Lock()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def stop_stub(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def judge_server(monkeypatch):
    """The stub on 127.0.0.1 at a free port; proxies unset so requests stay on loopback."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = start_stub()
    yield server
    stop_stub(server)


@pytest.fixture
def second_server(judge_server):
    """Another stub on 127.0.0.1 (another port), where ``judge_server`` redirects."""
    server = start_stub()
    host, port = server.server_address
    judge_server.redirect_to = f"http://{host}:{port}"
    yield server
    stop_stub(server)


def make_judge(server, **settings) -> JudgeLabeler:
    host, port = server.server_address
    options = {"api_key_env": KEY_ENV, "timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.001} | settings
    return JudgeLabeler(f"http://{host}:{port}/v1", "stub-model", **options)


def judge_modes(labeler: JudgeLabeler, modes: list[str]) -> list[int | None]:
    return labeler.label([f"{n}-{m}" for n, m in enumerate(modes)], ["the movie was"] * len(modes), modes)


def test_judge_labels_good_replies_and_counts_garbage_as_unparseable(judge_server):
    judge = make_judge(judge_server)
    assert judge_modes(judge, ["good", "garbage", "good"]) == [4, None, 4]
    assert judge.stats == {"labelled": 2, "unparseable": 1, "failed": 0, "retries": 0}
    assert len(judge_server.requests) == 3

    request = judge_server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    body = request["body"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("stub-model", 0, 16)
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "Score: N" in body["messages"][0]["content"]
    assert "<<<\nthe movie was\n>>>" in body["messages"][1]["content"]


def test_judge_retries_5xx_and_429_until_success(judge_server):
    judge = make_judge(judge_server, max_retries=2)
    assert judge_modes(judge, ["flaky", "rate_limited"]) == [2, 3]
    assert [r["mode"] for r in judge_server.requests] == ["flaky"] * 3 + ["rate_limited"] * 2
    assert judge.stats == {"labelled": 2, "unparseable": 0, "failed": 0, "retries": 3}


def test_judge_counts_an_item_failed_once_its_retries_are_spent(judge_server):
    judge = make_judge(judge_server, max_retries=2)
    assert judge_modes(judge, ["down", "good"]) == [None, 4]
    assert [r["mode"] for r in judge_server.requests] == ["down"] * 3 + ["good"]
    assert judge.stats == {"labelled": 1, "unparseable": 0, "failed": 1, "retries": 2}


def test_judge_does_not_retry_4xx_other_than_429(judge_server):
    judge = make_judge(judge_server, max_retries=3)
    assert judge_modes(judge, ["forbidden"]) == [None]
    assert len(judge_server.requests) == 1
    assert judge.stats == {"labelled": 0, "unparseable": 0, "failed": 1, "retries": 0}


def test_judge_abandons_a_stalled_request_at_its_timeout_and_retries_it(judge_server):
    judge = make_judge(judge_server, timeout_s=0.2, max_retries=1)
    started = time.monotonic()
    assert judge_modes(judge, ["stall"]) == [None]
    assert time.monotonic() - started < STALL_S  # two 0.2 s timeouts, not two 1 s stalls
    assert [r["mode"] for r in judge_server.requests] == ["stall", "stall"]
    assert judge.stats == {"labelled": 0, "unparseable": 0, "failed": 1, "retries": 1}


def test_judge_retries_a_refused_connection_then_fails():
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = JudgeLabeler(f"http://127.0.0.1:{port}/v1", "m", timeout_s=1.0, max_retries=2, backoff_s=0.001)
    assert judge.label(["a"], ["p"], ["r"]) == [None]
    assert judge.stats == {"labelled": 0, "unparseable": 0, "failed": 1, "retries": 2}


def test_judge_sends_the_key_from_the_env_var_and_never_shows_it(judge_server, monkeypatch, caplog, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = make_judge(judge_server, max_retries=1)
    with caplog.at_level(logging.WARNING, logger="uprlhf.selection.labelers"):
        assert judge_modes(judge, ["good", "garbage", "down", "forbidden"]) == [4, None, None, None]

    assert {r["headers"].get("Authorization") for r in judge_server.requests} == {f"Bearer {SECRET}"}
    # The 401 body echoes the key, as some APIs do: the log shows it masked.
    assert "HTTP 401" in caplog.text and "Incorrect API key provided: Bearer ***" in caplog.text
    captured = capsys.readouterr()
    for shown in (caplog.text, captured.out, captured.err, repr(judge), str(judge), str(judge.stats), str(vars(judge))):
        assert SECRET not in shown


def test_judge_sends_no_authorization_header_without_the_env_var(judge_server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert judge_modes(make_judge(judge_server), ["good"]) == [4]
    assert "Authorization" not in judge_server.requests[0]["headers"]


def test_judge_follows_no_redirect_and_never_sends_the_key_elsewhere(judge_server, second_server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = make_judge(judge_server, max_retries=2)
    with caplog.at_level(logging.WARNING, logger="uprlhf.selection.labelers"):
        assert judge_modes(judge, ["redirect"]) == [None]
    assert second_server.requests == []  # nothing, with or without the key, reached the other origin
    assert len(judge_server.requests) == 1  # a redirect is not retried either
    assert judge.stats == {"labelled": 0, "unparseable": 0, "failed": 1, "retries": 0}
    source = "http://127.0.0.1:%d" % judge_server.server_address[1]
    target = "http://127.0.0.1:%d" % second_server.server_address[1]
    assert "HTTP 307" in caplog.text and source in caplog.text and target in caplog.text
    assert "another origin" in caplog.text and SECRET not in caplog.text


@pytest.fixture
def no_network(monkeypatch):
    """Any name lookup or connection fails the test: the refusal must come before any traffic."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network use attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("url", ["http://example.com/v1", "http://192.0.2.7:8000/v1", "http://127.0.0.1.example.com/v1"])
def test_plain_http_to_a_non_loopback_host_is_refused_before_any_traffic(url, no_network):
    problem = check_judge_url(url)
    assert problem and "https://" in problem and "loopback" in problem and url in problem
    with pytest.raises(ValueError, match="plain http:// is allowed only for a loopback host"):
        JudgeLabeler(url, "m")


def test_judge_urls_that_are_accepted_and_refused(no_network):
    for good in ("https://api.example.com/v1", "http://127.0.0.1:8000/v1", "http://127.3.2.1/v1",
                 "http://[::1]:9000/v1", "http://localhost:8000/v1", "https://10.0.0.5/v1"):
        assert check_judge_url(good) is None, good
    for bad, why in (("", "empty"), ("ftp://example.com/v1", "https://"), ("example.com/v1", "https://"),
                     ("https://user:pw@api.example.com/v1", "credentials"), ("http://[::1/v1", "not a URL")):
        problem = check_judge_url(bad)
        assert problem and why in problem, (bad, problem)


def test_the_url_is_checked_again_at_request_time(no_network, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = JudgeLabeler("http://127.0.0.1:9/v1", "m", api_key_env=KEY_ENV, max_retries=2, backoff_s=0.001)
    judge.url = "http://example.com/v1/chat/completions"  # changed after construction
    with caplog.at_level(logging.WARNING, logger="uprlhf.selection.labelers"):
        assert judge.label(["a"], ["p"], ["r"]) == [None]
    assert judge.stats["failed"] == 1 and judge.stats["retries"] == 0
    assert "loopback" in caplog.text


# --- human -----------------------------------------------------------------

IDS = ["a", "b", "c", "d", "e"]


def label_in_thread(labeler: HumanLabeler, ids: list[str]) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        result["labels"] = labeler.label(ids, [f"prompt {i}" for i in ids], [f"response {i}" for i in ids])

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def wait_until_exists(path, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def publish_answers(path, lines: list[str]) -> None:
    """Write the answers file the way the README asks: under another name, then rename."""
    part = path.with_name(path.name + ".part")
    part.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(part, path)


def test_human_round_trip_keeps_valid_answers_and_reports_each_bad_line(tmp_path, caplog):
    labeler = HumanLabeler(tmp_path, wait_s=10, poll_s=0.02)
    with caplog.at_level(logging.WARNING, logger="uprlhf.selection.labelers"):
        thread, result = label_in_thread(labeler, IDS)
        wait_until_exists(tmp_path / "queue-0001.jsonl")
        publish_answers(
            tmp_path / "answers-0001.jsonl",
            [
                '{"id": "a", "label": 5}',
                '{"id": "zzz", "label": 3}',
                '{"id": "b", "label": 7}',
                '{"id": "c", "label": "4"}',
                '{"id": "d", "label": ',
                '{"id": "a", "label": 1}',
                '{"id": "d"}',
                '{"id": "b", "label": 2}',
                "[1, 2]",
                '{"id": "c", "label": true}',
                "",
                '{"id": "e", "label": 0}',
            ],
        )
        thread.join(timeout=10)

    assert result["labels"] == [5, 2, None, None, None]  # b's first *valid* line (8) counts
    assert labeler.problems[3].startswith("answers-0001.jsonl line 5: not valid JSON")
    assert labeler.problems[:3] + labeler.problems[4:] == [
        "answers-0001.jsonl line 2: id 'zzz' is not in the queue",
        "answers-0001.jsonl line 3: label must be an integer 1-5, got 7",
        "answers-0001.jsonl line 4: label must be an integer 1-5, got '4'",
        "answers-0001.jsonl line 6: duplicate id 'a' (the one on line 1 counts)",
        "answers-0001.jsonl line 7: missing field(s) ['label']",
        "answers-0001.jsonl line 9: expected a JSON object, got list",
        "answers-0001.jsonl line 10: label must be an integer 1-5, got True",
        "answers-0001.jsonl line 12: label must be an integer 1-5, got 0",
    ]
    assert labeler.stats == {"labelled": 2, "missing": 3, "invalid": 9, "timed_out": 0}
    warnings = [r.getMessage() for r in caplog.records if "problem(s)" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].splitlines()[1:] == labeler.problems

    queued = [json.loads(line) for line in (tmp_path / "queue-0001.jsonl").read_text().splitlines()]
    assert queued == [{"id": i, "prompt": f"prompt {i}", "response": f"response {i}"} for i in IDS]
    assert "answers-NNNN.jsonl" in (tmp_path / "README.txt").read_text()


def test_human_batch_without_answers_times_out_to_all_none(tmp_path):
    labeler = HumanLabeler(tmp_path, wait_s=0.2, poll_s=0.05)
    started = time.monotonic()
    assert labeler.label(IDS[:3], ["p"] * 3, ["r"] * 3) == [None, None, None]
    assert 0.2 <= time.monotonic() - started < 2.0
    assert labeler.stats == {"labelled": 0, "missing": 3, "invalid": 0, "timed_out": 1}


def test_human_batch_numbers_continue_after_a_restart(tmp_path):
    HumanLabeler(tmp_path, wait_s=0).label(["a"], ["p"], ["first"])
    HumanLabeler(tmp_path, wait_s=0).label(["a"], ["p"], ["second"])
    restarted = HumanLabeler(tmp_path, wait_s=0)
    restarted.label(["a"], ["p"], ["third"])
    queues = sorted(p.name for p in tmp_path.glob("queue-*.jsonl"))
    assert queues == ["queue-0001.jsonl", "queue-0002.jsonl", "queue-0003.jsonl"]
    assert json.loads((tmp_path / "queue-0003.jsonl").read_text())["response"] == "third"


def test_human_restart_waits_on_the_same_pending_batch_and_reads_its_answers(tmp_path):
    assert HumanLabeler(tmp_path, wait_s=0).label(["a", "b"], ["p", "p"], ["r1", "r2"]) == [None, None]
    publish_answers(tmp_path / "answers-0001.jsonl", ['{"id": "b", "label": 1}', '{"id": "a", "label": 4}'])
    restarted = HumanLabeler(tmp_path, wait_s=0)
    assert restarted.label(["a", "b"], ["p", "p"], ["r1", "r2"]) == [4, 1]
    assert sorted(p.name for p in tmp_path.glob("queue-*.jsonl")) == ["queue-0001.jsonl"]


def test_gold_labels_follow_the_quintiles_of_the_calibration_pool(tmp_path):
    labeler = GoldLabeler(FixedGold())
    pool = [str(x) for x in range(10)]  # quintile bands {0,1} {2,3} {4,5} {6,7} {8,9}
    labeler.calibrate(["p"] * 10, pool)
    # a selection of only high scorers keeps high labels instead of being spread over 1-5
    assert labeler.label(["a", "b", "c"], ["p"] * 3, ["8", "9", "7"]) == [5, 5, 4]
    assert labeler.label(["d"], ["p"], ["0"]) == [1]
