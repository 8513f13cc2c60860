"""The one contract every source keeps: an ordered stream of `SourceEvent`s.

The API watch emits them as the API reports changes; the manifest directory emits one
`listed` event per resource each time it rereads the directory. What the events mean to
the change tracker is decided once, in `kproxy.tracking.events`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from kproxy.state.model import KObject, Node, ObjectRef, Service

Resource = Literal["services", "endpointslices", "endpoints", "nodes"]
EventKind = Literal["listed", "upsert", "delete"]
RESOURCES: tuple[Resource, ...] = ("services", "endpointslices", "endpoints", "nodes")


@dataclass(frozen=True, slots=True)
class SourceEvent:
    """One thing a source learned, in order per resource.

    - `listed`: `items` is the complete current set for `resource` (keyed by API identity);
      apply it as a replace: anything of this resource not in it is gone. `gone` names what
      this source had reported before and is missing now. `initial` marks the first list.
    - `upsert`: `ref` now means `objects` (a legacy Endpoints may give one slice per family).
    - `delete`: `ref` is gone (deleted, no longer matching the selectors, or now unusable).
    """

    kind: EventKind
    resource: Resource
    ref: ObjectRef | None = None
    objects: tuple[KObject, ...] = ()
    items: Mapping[ObjectRef, tuple[KObject, ...]] = field(default_factory=dict)
    gone: frozenset[ObjectRef] = frozenset()
    initial: bool = False
    resource_version: str = ""


def resource_of(obj: KObject) -> Resource:
    """The API resource an object came from (a legacy Endpoints parses to slices marked `legacy`)."""
    if isinstance(obj, Service):
        return "services"
    if isinstance(obj, Node):
        return "nodes"
    return "endpoints" if obj.legacy else "endpointslices"
