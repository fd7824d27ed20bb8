"""The base of every config section, and the model section every domain shares.

Here, not in ``uprlhf.config``, because the domain configs (``uprlhf.data.config``,
``uprlhf.reward.config``, ``uprlhf.rl.config``, ``uprlhf.selection.config``) build
on it and ``uprlhf.config`` imports them all: the base must not import them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from typing_extensions import Self


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied and validated like a fresh config.

        Unlike ``model_copy(update=...)``, which skips validation, a bad value or a
        broken cross-field rule is an error here. Unchanged sub-sections are kept as
        they are (they are valid already).
        """
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**values, **changes})


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


@dataclass(frozen=True)
class TaggedUnion:
    """Marker that ``tagged_union`` puts on its type: which field tells the members apart."""

    field: str
    default: str
    members: dict[str, type[Section]]
    kind: str  # what a member is, for messages: "labeler"

    def tag_of(self, value: Any) -> str | None:
        if isinstance(value, dict):
            return value.get(self.field, self.default)
        return getattr(value, self.field, None)


def tagged_union(field: str, default: str, *members: type[Section], kind: str) -> Any:
    """One config type per kind, told apart by ``field`` (a discriminated union); ``default`` when it is left out.

    Each member declares ``field: Literal["its tag"]``, so a field that belongs to
    another kind is an unknown field, and YAML stays flat: ``{name: human, wait_s: 60}``.
    """
    by_tag: dict[str, type[Section]] = {}
    for member in members:
        (tag,) = get_args(member.model_fields[field].annotation)
        by_tag[tag] = member
    if default not in by_tag:
        raise ValueError(f"default {field} {default!r} is none of {list(by_tag)}")
    marker = TaggedUnion(field, default, by_tag, kind)
    union = Union[tuple(Annotated[member, Tag(tag)] for tag, member in by_tag.items())]  # noqa: UP007
    return Annotated[union, Discriminator(marker.tag_of), marker]


def find_union(annotation: Any, metadata: Sequence[object] = ()) -> TaggedUnion | None:
    """The ``TaggedUnion`` marker of a field (its metadata, or its annotation), if it is one."""
    for item in (*metadata, *get_args(annotation)):
        if isinstance(item, TaggedUnion):
            return item
    return None
