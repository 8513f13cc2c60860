"""The effective configuration as kube-proxy's /configz on the metrics port shows it.

kube-proxy registers its KubeProxyConfiguration with component-base's configz
under the API group name and serves `{"kubeproxy.config.k8s.io": {...}}`, the
configuration after flags, file and defaults were merged, with Go's field names
and durations written as Go prints them ("30s", "1h0m0s"). Tools that diff a
node's effective configuration against the ConfigMap read this document, so the
keys follow the KubeProxyConfiguration API (fields kproxy only accepts and warns about are left out).
"""

from __future__ import annotations

from typing import Any

from kproxy.settings import Settings, effective_config

GROUP = "kubeproxy.config.k8s.io"


def go_duration(seconds: float) -> str:
    """A duration as Go's time.Duration.String() writes it: 30s, 100ms, 1m30s, 1h0m0s, 0s."""
    if seconds == 0:
        return "0s"
    ns = round(seconds * 1e9)
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("µs", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim(ns / size) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    secs = _trim(rest / 1e9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{secs}"
    if minutes:
        return f"{sign}{minutes}m{secs}"
    return sign + secs


def _trim(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".")


def configuration(s: Settings) -> dict[str, Any]:
    """Every KubeProxyConfiguration field, as the running agent uses it (the same document
    `--write-config-to` writes), plus the internal config's top-level sync periods."""
    doc = effective_config(s, dur=go_duration)
    del doc["apiVersion"], doc["kind"]
    doc["syncPeriod"] = go_duration(s.sync_period)
    doc["minSyncPeriod"] = go_duration(s.min_sync_period)
    return doc


def configz(s: Settings) -> dict[str, Any]:
    """The whole /configz document."""
    return {GROUP: configuration(s)}
