import json

import pytest

from uprlhf.rl.alarm import AlarmConfig, HackingAlarm, steps_before_peak

# u wobbles in a narrow band around 1.0 (mean 1.0, sample std ≈ 0.0158 over these 6 values)
CALM_U = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]


def feed(alarm: HackingAlarm, us: list[float], proxies: list[float], start: int = 0) -> list[bool]:
    return [alarm.update(start + i, u, p) for i, (u, p) in enumerate(zip(us, proxies))]


def test_fires_when_u_leaves_band_while_proxy_rises():
    alarm = HackingAlarm(AlarmConfig(warmup_steps=5, band_sigmas=2.0, trend_window=5))
    us = CALM_U + [1.5, 1.6, 1.7]
    proxies = [0.1 * i for i in range(len(us))]
    fired = feed(alarm, us, proxies)
    assert fired == [False] * 6 + [True] * 3
    assert alarm.fired_steps == [6, 7, 8]


def test_fired_steps_stay_out_of_the_band_so_a_sustained_rise_keeps_firing():
    alarm = HackingAlarm()
    feed(alarm, CALM_U, [0.1 * i for i in range(6)])
    threshold = alarm.threshold
    feed(alarm, [2.0] * 20, [1.0 + 0.1 * i for i in range(20)], start=6)
    assert alarm.fired_steps == list(range(6, 26))
    assert alarm.threshold == pytest.approx(threshold)


def test_does_not_fire_when_proxy_falls():
    alarm = HackingAlarm()
    us = CALM_U + [1.5, 1.6, 1.7]
    proxies = [-0.1 * i for i in range(len(us))]
    assert not any(feed(alarm, us, proxies))
    assert alarm.fired_steps == []


def test_does_not_fire_while_u_stays_in_band():
    alarm = HackingAlarm()
    us = CALM_U * 3
    assert not any(feed(alarm, us, [0.1 * i for i in range(len(us))]))


def test_does_not_fire_during_warmup():
    alarm = HackingAlarm(AlarmConfig(warmup_steps=4, trend_window=2))
    # step 3 jumps while only three steps form the band; step 4 jumps out of the full band
    fired = feed(alarm, [1.0, 1.1, 0.9, 50.0, 100.0], [0.0, 1.0, 2.0, 3.0, 4.0])
    assert fired == [False, False, False, False, True]
    # the warm-up jump went into the band: mean 13.25, sample std ≈ 24.5
    assert alarm.threshold == pytest.approx(13.25 + 2 * 24.5, rel=1e-3)


def test_threshold_is_mean_plus_k_sample_std_of_previous_steps():
    alarm = HackingAlarm(AlarmConfig(warmup_steps=3, band_sigmas=1.5))
    assert alarm.threshold is None
    feed(alarm, [1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert alarm.threshold == pytest.approx(2.0 + 1.5 * 1.0)


@pytest.mark.parametrize(
    ("last_proxy", "fires"),
    [
        # window proxies [0, 5, -5, -5, 1]: ends above its start, yet the slope is -0.8
        (1.0, False),
        # [0, 5, -5, -5, 10]: slope +1.0
        (10.0, True),
    ],
)
def test_trend_is_the_least_squares_slope_over_the_window(last_proxy, fires):
    alarm = HackingAlarm(AlarmConfig(warmup_steps=5, trend_window=5))
    feed(alarm, CALM_U + [1.0, 1.0, 1.0], [0.0] * 6 + [5.0, -5.0, -5.0])
    assert alarm.update(9, 3.0, last_proxy) is fires


def test_band_window_follows_slow_drift():
    alarm = HackingAlarm(AlarmConfig(warmup_steps=3, band_window=3))
    us = [1.0, 1.1, 0.9, 2.0, 2.1, 1.9]
    feed(alarm, us, [0.0] * len(us))  # flat proxy: never fires, every u enters the band
    assert alarm.state_dict()["band"] == [2.0, 2.1, 1.9]
    assert alarm.threshold == pytest.approx(2.0 + 2 * 0.1)


def test_state_round_trips_through_json_and_continues_the_band():
    us = CALM_U + [1.5, 1.01, 1.6, 0.99]
    proxies = [0.1 * i for i in range(len(us))]
    reference = HackingAlarm()
    expected = feed(reference, us, proxies)

    first = HackingAlarm()
    fired = feed(first, us[:7], proxies[:7])
    resumed = HackingAlarm()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    fired += feed(resumed, us[7:], proxies[7:], start=7)

    assert fired == expected
    assert resumed.fired_steps == reference.fired_steps == [6, 8]
    assert resumed.state_dict() == reference.state_dict()


def test_rejects_steps_that_do_not_increase_and_non_finite_values():
    alarm = HackingAlarm()
    alarm.update(3, 1.0, 0.0)
    with pytest.raises(ValueError, match="steps must increase"):
        alarm.update(3, 1.0, 0.0)
    with pytest.raises(ValueError, match="uncertainty at step 4"):
        alarm.update(4, float("nan"), 0.0)


@pytest.mark.parametrize(
    "kwargs", [{"warmup_steps": 1}, {"band_window": 3}, {"trend_window": 1}, {"band_sigmas": -1.0}]
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        AlarmConfig(**kwargs)


def test_steps_before_peak():
    steps = [0, 10, 20, 30, 40]
    gold = [0.1, None, 0.5, 0.3, 0.5]
    assert steps_before_peak(12, steps, gold) == 8  # peak at 20 (earliest of the tie)
    assert steps_before_peak(25, steps, gold) == -5
    assert steps_before_peak(None, steps, gold) is None
    with pytest.raises(ValueError):
        steps_before_peak(1, [0, 1], [0.2])
