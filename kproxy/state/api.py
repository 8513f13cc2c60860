"""The raw API objects the parser reads, as decoded JSON or YAML: the top-level fields of
Service, EndpointSlice, v1 Endpoints and Node, and their metadata.

Values are `object` on purpose: input is untrusted until `kproxy.state.parse` has checked
each field, so these types name which fields are read, never what they hold.
"""

from __future__ import annotations

from typing import TypedDict


class RawMeta(TypedDict, total=False):
    name: object
    namespace: object
    resourceVersion: object
    labels: object
    annotations: object
    deletionTimestamp: object


class RawObject(TypedDict, total=False):
    """Any of the four kinds: each reads its own subset of these fields."""

    apiVersion: object
    kind: object
    metadata: object
    spec: object
    """Service, Node."""
    status: object
    """Service (load-balancer ingress), Node (addresses)."""
    addressType: object
    """EndpointSlice."""
    endpoints: object
    """EndpointSlice."""
    ports: object
    """EndpointSlice."""
    subsets: object
    """v1 Endpoints."""
