"""Typed job configs: YAML files plus dotted ``key=value`` overrides, validated up front.

Every field carries its documentation in ``Field(description=...)`` so that
``describe(Config)`` prints the reference and a bad value is reported as one line
naming the field, the value and what is allowed, before any actor starts.

Each domain's sections live beside it (``uprlhf.data.config``, ``uprlhf.reward.config``,
``uprlhf.rl.config``, ``uprlhf.selection.config``), on the base in ``uprlhf.section``;
this module holds the machinery, the cross-domain pipeline configs, and re-exports
every config class by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from uprlhf.data.config import PrepareDataConfig
from uprlhf.reward.config import ENSEMBLE_KINDS, EnsembleConfig, EnsembleKind, TrainConfig, TrainRewardConfig, default_kinds
from uprlhf.rl.config import (
    AlarmConfig,
    BestOfNConfig,
    ExtraReward,
    HFRolloutConfig,
    KLConfig,
    LearnerConfig,
    NoveltyConfig,
    PenaltyConfig,
    PolicyConfig,
    PPOConfig,
    RLConfig,
    RolloutConfig,
    SampleAndScoreConfig,
    VLLMRolloutConfig,
)
from uprlhf.registry import find_registry
from uprlhf.section import ModelConfig, Section, find_union
from uprlhf.sft.config import SFTConfig
from uprlhf.selection.config import (
    GoldLabelerConfig,
    HumanLabelerConfig,
    LabelerConfig,
    LLMJudgeLabelerConfig,
    RefineConfig,
    SelectorConfig,
)

__all__ = [
    "ENSEMBLE_KINDS",
    "default_kinds",
    "AlarmConfig",
    "BestOfNConfig",
    "ConfigError",
    "EnsembleConfig",
    "EnsembleKind",
    "ExtraReward",
    "GoldLabelerConfig",
    "HFRolloutConfig",
    "HumanLabelerConfig",
    "KLConfig",
    "LabelerConfig",
    "LearnerConfig",
    "LLMJudgeLabelerConfig",
    "ModelConfig",
    "NoveltyConfig",
    "PenaltyConfig",
    "PipelineConfig",
    "PipelineRLConfig",
    "PolicyConfig",
    "PPOConfig",
    "PrepareDataConfig",
    "RefineConfig",
    "RLConfig",
    "RolloutConfig",
    "SampleAndScoreConfig",
    "Section",
    "SelectorConfig",
    "TrainConfig",
    "TrainRewardConfig",
    "VLLMRolloutConfig",
    "build",
    "describe",
    "fingerprint",
    "load_config",
    "parse_override",
    "set_dotted",
    "to_yaml",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message is meant to be shown as it is."""


class PipelineRLConfig(Section):
    base: RLConfig = Field(default_factory=RLConfig, description="Settings shared by every penalty run.")
    penalties: list[PenaltyConfig] = Field(
        default_factory=lambda: [PenaltyConfig(name="mean"), PenaltyConfig(name="up_rlhf", coefficients={"beta": 1.0})],
        min_length=1,
        description="Penalties compared from the same start, each a PPO run in OUTPUT_DIR/rl/<name>.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> PipelineRLConfig:
        names = [p.name for p in self.penalties]
        if len(set(names)) != len(names):
            raise ValueError(f"penalties must have distinct names (each is one run folder), got {names}")
        return self


class PipelineConfig(Section):
    data: PrepareDataConfig = Field(default_factory=PrepareDataConfig, description="Step 1 data.")
    sft: SFTConfig | None = Field(
        None,
        description="Step 1 SFT, off when null: fine-tune the policy on the data stage's SFT examples first (set "
        "data.sft_completions_per_prompt >= 1, or sft.data_file); every PPO run then starts from and regularises towards "
        "OUTPUT_DIR/sft/policy.",
    )
    reward: TrainRewardConfig = Field(default_factory=TrainRewardConfig, description="Step 2 ensembles.")
    rl: PipelineRLConfig = Field(default_factory=PipelineRLConfig, description="Step 3 PPO per penalty.")
    selector: SelectorConfig = Field(
        default_factory=SelectorConfig,
        description="Reward refinement during every PPO run (off, or a strategy); the pipeline's one place for it.",
    )

    @model_validator(mode="after")
    def _one_selector(self) -> PipelineConfig:
        if self.rl.base.selector.enabled:
            raise ValueError("set the selector at the top level ('selector.strategy=...'), not in rl.base.selector")
        return self

    @model_validator(mode="after")
    def _sft_feeds_rl(self) -> PipelineConfig:
        """SFT needs examples, and must fine-tune the model the PPO runs use, seen through the same template."""
        if self.sft is None:
            return self
        if self.sft.data_file is None and self.data.sft_completions_per_prompt < 1:
            raise ValueError("sft is set but the data stage writes no SFT examples: set data.sft_completions_per_prompt >= 1 "
                             "(or sft.data_file)")
        for key in ("model", "prompt_template"):
            mine, theirs = getattr(self.sft.policy, key), getattr(self.rl.base.policy, key)
            if mine != theirs:
                raise ValueError(f"sft.policy.{key} ({mine!r}) differs from rl.base.policy.{key} ({theirs!r}); "
                                 "SFT must fine-tune the policy PPO then trains")
        return self


C = TypeVar("C", bound=BaseModel)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c = value`` in nested dicts, creating the levels that are missing."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value read as YAML (so 3, true, [a, b] keep their types)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err.problem})") from None
    return key.strip(), value


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list[str], Any, str]:
    """Follow an error location through the config types.

    Returns the dotted parts to show (a tagged union's tag is not a key in the YAML,
    so it is left out), the type the location ends in, and a note naming the kind
    chosen on the way (``labeler name=llm_judge``) for unknown-field errors.
    """
    node: Any = model
    shown: list[str] = []
    note = ""
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        shown.append(str(part))
        fields = getattr(node, "model_fields", None) if isinstance(node, type) else None
        if fields is None or part not in fields:
            node = None
            continue
        field = fields[part]
        node = field.annotation
        metadata = field.metadata
        while True:
            union = find_union(node, metadata)
            if union is not None and parts and parts[0] in union.members:
                tag = parts.pop(0)
                note = f" (for {part} {union.field}={tag})"
                node, metadata = union.members[tag], ()
                continue
            args = [a for a in get_args(node) if a is not type(None)]
            if parts and isinstance(parts[0], int) and get_origin(node) in (list, tuple) and args:
                shown.append(str(parts.pop(0)))
                node, metadata = args[0], ()
                continue
            if parts and get_origin(node) is dict and len(args) == 2:
                shown.append(str(parts.pop(0)))
                node, metadata = args[1], ()
                continue
            break
    return shown, node, note


def _format_error(model: type[BaseModel], err: dict) -> str:
    loc = tuple(err["loc"])
    shown, node, note = _walk(model, loc)
    where = ".".join(shown) or "(config)"
    if err["type"] == "extra_forbidden":
        _, parent, _ = _walk(model, loc[:-1])
        allowed = sorted(getattr(parent, "model_fields", {})) if isinstance(parent, type) else []
        return f"{where}: unknown field{note}; allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{where}: required{note}"
    if err["type"] == "union_tag_invalid":
        union = None
        _, parent, _ = _walk(model, loc[:-1])
        field = getattr(parent, "model_fields", {}).get(loc[-1]) if loc and isinstance(parent, type) else None
        if field is not None:
            union = find_union(field.annotation, field.metadata)
        key, kind = (union.field, union.kind) if union is not None else ("kind", "kind")
        tag = err.get("ctx", {}).get("tag")
        return f"{where}.{key} = {tag!r}: unknown {kind} {tag!r}; allowed: {err.get('ctx', {}).get('expected_tags')}"
    msg = _shorten(err["msg"].removeprefix("Value error, "), MAX_MESSAGE)
    if not loc:
        return msg  # a rule of the whole config: its message names the fields
    value = err.get("input")
    shown_value = repr(value)
    if isinstance(value, (dict, BaseModel)) or len(shown_value) > MAX_INPUT:
        # A rule of a whole section (its input is the section): the field and the reason
        # first, then as much of the input as fits.
        return f"{where}: {msg} (got {_shorten(shown_value, MAX_INPUT)})"
    return f"{where} = {shown_value}: {msg}"


# Longest input repr and reason one error line shows; longer ones end in '…'.
MAX_INPUT = 60
MAX_MESSAGE = 300


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build(model: type[C], tree: dict, source: str = "config") -> C:
    """Validate a plain dict into ``model``; the error lists every bad field, one per line."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        lines = [_format_error(model, e) for e in err.errors()]
        raise ConfigError(f"{source}: " + "\n".join(lines)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges keys that the mapping's own keys may override
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(key, line)
        self.key, self.line = key, line


def _read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; every way it can be unusable is one ConfigError line."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {err.start}); save the config as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}:{err.line}: duplicate key {err.key!r}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_config(model: type[C], path: str | Path | None, overrides: list[str] = ()) -> C:
    """Read YAML (optional; a key given twice is an error), apply dotted overrides, validate."""
    tree: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        loaded = _read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of fields")
        tree = loaded or {}
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
    return build(model, tree, source)


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def fingerprint(config: BaseModel) -> str:
    """Stable hash of a config, used to tell whether cached outputs still match it."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(model: type[BaseModel], prefix: str = "", *, exclude: frozenset[str] = frozenset()) -> list[str]:
    """One line per field, dotted, with its type, default and documentation.

    A field that names a registry entry lists the registered names. A field with
    one config type per kind (``selector.labeler``, ``rl.rollout``) lists the fields
    every kind has, then each kind's own, marked ``[name=llm_judge]``.
    """
    lines = []
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        key = f"{prefix}{name}"
        annotation = field.annotation
        union = find_union(annotation, field.metadata)
        if union is not None:
            lines.append(f"{key}: {field.description}")
            default = field.get_default(call_default_factory=True)
            members = list(union.members.values())
            shared = frozenset.intersection(*(frozenset(m.model_fields) for m in members)) - {union.field}
            lines.append(
                f"{key}.{union.field} (default {getattr(default, union.field, union.default)!r}): "
                f"Which kind; one of: {', '.join(union.members)}."
            )
            first = members[0]
            lines.extend(describe(first, f"{key}.", exclude=frozenset(first.model_fields) - shared))
            for tag, member in union.members.items():
                own = describe(member, f"{key}.", exclude=shared | {union.field})
                lines.extend(line.replace(" ", f" [{union.field}={tag}] ", 1) for line in own)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.append(f"{key}: {field.description}")
            lines.extend(describe(annotation, f"{key}."))
        else:
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
            ref = find_registry(annotation, field.metadata)
            allowed = f" One of: {', '.join(ref.names())}." if ref is not None else ""
            lines.append(f"{key} ({default}): {field.description}{allowed}")
    return lines
