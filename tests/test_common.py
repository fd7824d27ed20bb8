import time

import pytest

from jobs import common


class FakeMetric:
    made: dict[str, "FakeMetric"] = {}

    def __init__(self, name, description="", tag_keys=()):
        self.name, self.sets = name, []
        FakeMetric.made[name] = self

    def set(self, value, tags=None):
        self.sets.append((value, dict(tags)))

    def inc(self, value, tags=None):
        self.sets.append((value, dict(tags)))


def test_gauges_set_their_last_values_again_until_closed(monkeypatch):
    import ray.util.metrics

    monkeypatch.setattr(ray.util.metrics, "Gauge", FakeMetric)
    monkeypatch.setattr(ray.util.metrics, "Counter", FakeMetric)
    gauges = common.Gauges("run-a", ("train",), refresh_s=0.05)
    gauges.record({"kl": 1.5, "seconds_train": 2.0, "gold": None, "alarm": True})
    time.sleep(0.3)
    gauges.close()
    kl = FakeMetric.made["uprlhf_kl"].sets
    assert len(kl) >= 3 and all(s == (1.5, {"run": "run-a"}) for s in kl)  # refreshed with the same value and tag
    assert FakeMetric.made["uprlhf_gold"].sets == []  # never recorded: nothing to refresh
    assert FakeMetric.made["uprlhf_hacking_alarms"].sets == [(1.0, {"run": "run-a"})]  # a counter counts once
    after = len(kl)
    time.sleep(0.15)
    assert len(FakeMetric.made["uprlhf_kl"].sets) == after


@pytest.mark.parametrize("value", ["abc", "0", "70000"])
def test_a_metrics_port_that_is_not_a_port_is_one_config_error(value, monkeypatch):
    monkeypatch.setenv("UPRLHF_METRICS_PORT", value)
    with pytest.raises(common.ConfigError, match=f"UPRLHF_METRICS_PORT='{value}': expected a TCP port, 1-65535"):
        common.metrics_export_port()
