"""The base of every config section, and the model section every domain shares.

Here, not in ``uprlhf.config``, because the domain configs (``uprlhf.data.config``,
``uprlhf.reward.config``, ``uprlhf.rl.config``, ``uprlhf.selection.config``) build
on it and ``uprlhf.config`` imports them all: the base must not import them back.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, SerializeAsAny, ValidationError, field_validator
from typing_extensions import Self


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated.

    No float field takes inf or nan (``kl.coef=.inf`` would pass every bound and poison
    the run); that covers floats inside lists and dicts (``penalty.coefficients``) too.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied and validated like a fresh config.

        Unlike ``model_copy(update=...)``, which skips validation, a bad value or a
        broken cross-field rule is an error here. Unchanged sub-sections are kept as
        they are (they are valid already).
        """
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**values, **changes})


# The models that packages ship (``uprlhf.models.resolve`` finds their folders).
PACKAGED_MODELS = ("packaged:smollm2", "packaged:minilm")


class ModelConfig(Section):
    name_or_path: str = Field(
        description="Model to load: a local folder, a hub id, or a packaged model "
        "('packaged:smollm2' policy, 'packaged:minilm' reward backbone).",
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model's own Python code to run; off unless you trust the source."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype; float32 on CPU."
    )

    @field_validator("name_or_path")
    @classmethod
    def _known_package(cls, name: str) -> str:
        if name.startswith("packaged:") and name not in PACKAGED_MODELS:
            raise ValueError(f"unknown packaged model {name!r}; allowed: {', '.join(PACKAGED_MODELS)}")
        return name


@dataclass(frozen=True)
class TaggedUnion:
    """Marker that ``tagged_union`` puts on its type: which field tells the members apart.

    The members are the built-in ones plus every entry of ``registry`` (``"module:ATTR"``,
    each entry carrying its ``config_type``), looked up when a config is validated: a
    new kind registered in its own module (a labeler, a rollout backend) brings its
    config type with it, and no config module changes.
    """

    field: str
    default: str
    builtin: dict[str, type[Section]]
    kind: str  # what a member is, for messages: "labeler"
    registry: str = ""

    @property
    def members(self) -> dict[str, type[Section]]:
        members = dict(self.builtin)
        if self.registry:
            module, attr = self.registry.split(":")
            entries = getattr(importlib.import_module(module), attr)
            members.update({name: entries.get(name).config_type for name in entries.names()})
        return members

    def tag_of(self, value: Any) -> str | None:
        if isinstance(value, dict):
            return value.get(self.field, self.default)
        return getattr(value, self.field, None)

    def validate(self, value: Any) -> Section:
        """The member config that ``value`` names by its tag, validated (an unknown tag lists the allowed ones)."""
        tag = self.tag_of(value)
        members = self.members
        if tag not in members:
            problem = ValueError(f"unknown {self.kind} {tag!r}; allowed: {', '.join(repr(t) for t in members)}")
            raise ValidationError.from_exception_data(
                self.kind, [{"type": "value_error", "loc": (self.field,), "input": tag, "ctx": {"error": problem}}]
            )
        member = members[tag]
        if isinstance(value, member):
            return value
        if isinstance(value, Section):
            value = value.model_dump()
        try:
            return member.model_validate(value)
        except ValidationError as err:  # located under the tag, as a discriminated union reports it
            errors = [{**e, "loc": (tag, *e["loc"])} for e in err.errors()]
            for e in errors:
                e.pop("url", None)
                if "ctx" in e and "error" in e["ctx"]:
                    e["ctx"] = {**e["ctx"], "error": str(e["ctx"]["error"])}
            raise ValidationError.from_exception_data(err.title, errors) from None


def tagged_union(field: str, default: str, *members: type[Section], kind: str, registry: str = "") -> Any:
    """One config type per kind, told apart by ``field``; ``default`` when it is left out.

    Each member declares ``field: Literal["its tag"]``, so a field that belongs to
    another kind is an unknown field, and YAML stays flat: ``{name: human, wait_s: 60}``.
    With ``registry``, the kinds registered there are members too (their ``config_type``).
    """
    by_tag: dict[str, type[Section]] = {}
    for member in members:
        (tag,) = get_args(member.model_fields[field].annotation)
        by_tag[tag] = member
    if default not in by_tag:
        raise ValueError(f"default {field} {default!r} is none of {list(by_tag)}")
    marker = TaggedUnion(field, default, by_tag, kind, registry)
    return Annotated[SerializeAsAny[Section], PlainValidator(marker.validate), marker]


def find_union(annotation: Any, metadata: Sequence[object] = ()) -> TaggedUnion | None:
    """The ``TaggedUnion`` marker of a field (its metadata, or its annotation), if it is one."""
    for item in (*metadata, *get_args(annotation)):
        if isinstance(item, TaggedUnion):
            return item
    return None
