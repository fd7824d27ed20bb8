"""The one registry type behind every name → implementation table, and its config field type."""

import pytest
from pydantic import ValidationError

from uprlhf.config import ConfigError, build, describe
from uprlhf.registry import Registry, RegistryNames, UnknownName, registry_name
from uprlhf.section import Section


def fresh() -> Registry:
    registry: Registry = Registry("colour")
    registry.register("red")(1)
    registry.register("green")(2)
    return registry


def test_entries_keep_registration_order_and_read_like_a_mapping():
    colours = fresh()
    assert colours.names() == ("red", "green") and list(colours) == ["red", "green"] and len(colours) == 2
    assert colours.get("green") == 2 and colours["red"] == 1
    assert "red" in colours and "blue" not in colours
    assert colours.items() == [("red", 1), ("green", 2)]


def test_a_duplicate_name_is_rejected_and_the_first_entry_kept():
    colours = fresh()
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        colours.register("red")(3)
    assert colours.get("red") == 1


def test_an_unknown_name_is_one_error_listing_the_allowed_names():
    with pytest.raises(UnknownName, match=r"^unknown colour 'blue'; allowed: 'red', 'green'$") as err:
        fresh().get("blue")
    assert isinstance(err.value, ValueError) and isinstance(err.value, LookupError)


def test_unregister_removes_a_name():
    colours = fresh()
    colours.unregister("red")
    assert colours.names() == ("green",)
    with pytest.raises(UnknownName):
        colours.unregister("red")


def test_metadata_goes_through_make_and_is_refused_without_it():
    def make(name, obj, *, weight=1):
        return (name, obj, weight)

    weighted = Registry("weighted", make=make)
    weighted.register("a", weight=3)("x")
    assert weighted.get("a") == ("a", "x", 3)
    with pytest.raises(TypeError):
        weighted.register("b", colour="red")("y")
    assert "b" not in weighted
    with pytest.raises(TypeError, match="takes no metadata"):
        fresh().register("blue", weight=2)(3)


COLOURS = fresh()


class Paint(Section):
    colour: registry_name(COLOURS) = "red"
    mixed: list[registry_name(COLOURS, "none")] = []


def test_a_config_field_validates_against_the_registry():
    assert Paint(colour="green", mixed=["none", "red"]).colour == "green"
    with pytest.raises(ValidationError, match="unknown colour 'blue'; allowed: 'red', 'green'"):
        Paint(colour="blue")
    with pytest.raises(ConfigError) as err:
        build(Paint, {"mixed": ["red", "blue"]})
    assert str(err.value) == "config: mixed.1 = 'blue': unknown colour 'blue'; allowed: 'none', 'red', 'green'"


def test_a_field_sees_names_registered_after_the_config_was_defined():
    COLOURS.register("blue")(3)
    try:
        assert Paint(colour="blue").colour == "blue"
    finally:
        COLOURS.unregister("blue")
    with pytest.raises(ValidationError):
        Paint(colour="blue")


def test_describe_lists_the_registered_names():
    lines = describe(Paint)
    assert lines[0].endswith("One of: red, green.") and lines[1].endswith("One of: none, red, green.")


def test_a_registry_named_by_import_path_is_resolved_on_use():
    class Shaping(Section):
        penalty: registry_name("uprlhf.rl.penalties:PENALTIES") = "mean"

    assert Shaping(penalty="lcb").penalty == "lcb"
    with pytest.raises(ValidationError, match="unknown penalty 'nope'; allowed: 'mean', 'lcb'"):
        Shaping(penalty="nope")
    with pytest.raises(ValueError, match="module:ATTRIBUTE"):
        registry_name("uprlhf.rl.penalties.PENALTIES")
    kinds = RegistryNames("uprlhf.reward.ensembles:ENSEMBLES")
    assert kinds == ("independent", "linear", "frozen_heads", "lora", "diverse_lora", "single", "multi_backbone") and "lora" in kinds


def test_every_library_registry_is_a_registry():
    from uprlhf.data.gold import GOLD_SCORERS
    from uprlhf.reward.ensembles import ENSEMBLES
    from uprlhf.rl.estimators import ADVANTAGE_ESTIMATORS
    from uprlhf.rl.penalties import PENALTIES
    from uprlhf.rl.policy import PROMPT_TEMPLATES
    from uprlhf.rl.ppo import KL_ESTIMATORS
    from uprlhf.rl.rollout import ROLLOUT_ENGINES
    from uprlhf.selection.labelers import LABELERS
    from uprlhf.selection.strategies import STRATEGIES

    registries = [GOLD_SCORERS, ENSEMBLES, ADVANTAGE_ESTIMATORS, PENALTIES, PROMPT_TEMPLATES, KL_ESTIMATORS,
                  ROLLOUT_ENGINES, LABELERS, STRATEGIES]
    assert all(isinstance(r, Registry) and len(r) for r in registries)
    assert len({r.kind for r in registries}) == len(registries)
