"""nftables mode publishes kube-proxy's nftables-mode metric names: a failed transaction counts
in kubeproxy_sync_proxy_rules_nftables_sync_failures_total, a failed cleanup beside it in
..._nftables_cleanup_failures_total, and the iptables-only series are absent, as in
kube-proxy's RegisterMetrics for that mode."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kproxy.agent import NodeAgent
from kproxy.backends.nftables.proxier import NftablesProxier
from kproxy.errors import NftablesError
from kproxy.metrics import Metrics
from kproxy.settings import Settings
from tests.support.objects import eps, svc

NFT_SERIES = (
    "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
    "kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total",
)
IPT_SERIES = (
    "kubeproxy_sync_proxy_rules_iptables_restore_failures_total",
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures_total",
    "kubeproxy_sync_proxy_rules_iptables_total",
    "kubeproxy_sync_proxy_rules_iptables_last",
)


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.exposition().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def names(m: Metrics) -> set[str]:
    return {name for name, _ in samples(m)}


@pytest.mark.parametrize(("mode", "present", "absent"), [("nftables", NFT_SERIES, IPT_SERIES),
                                                        ("iptables", IPT_SERIES, NFT_SERIES)])  # fmt: skip
def test_each_mode_registers_its_own_series(
    mode: str, present: tuple[str, ...], absent: tuple[str, ...]
) -> None:
    m = Metrics(families=(4, 6), mode=mode)
    got = names(m)
    assert set(present) <= got
    assert not set(absent) & got
    # The series shared by every mode are there in both.
    assert "kubeproxy_sync_proxy_rules_duration_seconds_count" in got


def test_nftables_failures_count_per_family() -> None:
    m = Metrics(families=(4, 6), mode="nftables")
    m.restore_failed(6, partial=True)
    m.restore_failed(6, partial=False)
    m.cleanup_failed(4)
    m.set_rules(4, "nat", total=3, last=1)  # nothing to set in this mode; must not raise
    got = samples(m)
    fam6, fam4 = (("ip_family", "IPv6"),), (("ip_family", "IPv4"),)
    assert got[("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", fam6)] == 2
    assert got[("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", fam4)] == 0
    assert got[("kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", fam4)] == 1


class Writer:
    """Accepts every script until told to refuse the next one, as `nft` refuses a transaction."""

    def __init__(self) -> None:
        self.fail = False
        self.scripts: list[str] = []

    def apply(self, family: int, script: str) -> None:
        if self.fail:
            self.fail = False
            raise NftablesError(family, 1, "Error: Could not process rule: No such file or directory")
        self.scripts.append(script)

    def table_present(self, family: int) -> bool:
        return bool(self.scripts)

    def read(self, family: int, command: str) -> str:
        raise NftablesError(family, 1, "Error: No such file or directory")


def test_agent_counts_a_refused_transaction_and_a_failed_cleanup_under_nftables_names() -> None:
    writer = Writer()
    cleanups: list[int] = []

    def clean_iptables(family: int) -> int:
        cleanups.append(family)
        return -1 if len(cleanups) == 1 else 0  # the first removal fails, the retry succeeds

    backend = NftablesProxier(writer, clean_iptables=clean_iptables)
    settings = Settings(node_name="node-a", families=(4,), healthz_bind_address="", metrics_bind_address="")
    agent = NodeAgent(settings, backend)
    agent.tracker.replace("Service", [svc("web")])
    agent.tracker.replace("EndpointSlice", [eps("web")])
    agent.tracker.replace("Node", [])
    assert asyncio.run(agent._sync()) is True
    agent.tracker.upsert(eps("web", ("10.244.0.7",)))
    agent.changed()
    writer.fail = True
    assert asyncio.run(agent._sync()) is False
    assert asyncio.run(agent._sync()) is True  # the retry is a full sync, which cleans again

    got = samples(agent.metrics)
    fam4 = (("ip_family", "IPv4"),)
    assert got[("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", fam4)] == 1
    assert got[("kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", fam4)] == 1
    assert cleanups == [4, 4]
    assert not set(IPT_SERIES) & names(agent.metrics)
