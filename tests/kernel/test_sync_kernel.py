"""The sync engine against real kernels (legacy and nft), each inside throw-away namespaces.

The yardstick everywhere: whatever sequence of partial syncs ran, the kernel must hold
exactly what one fresh full sync of the final state writes into an empty namespace.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.backends.iptables.sync import SyncEngine
from kproxy.config import RenderConfig
from kproxy.errors import RestoreError
from kproxy.netfilter.restore import CommandRestorer, XtablesBackend
from kproxy.state.model import Family
from tests.support.netns import create_netns, delete_netns, netns_guard
from tests.support.sync_cases import View, cluster, cluster6, port_name, service, with_endpoints

pytestmark = pytest.mark.privileged
__all__ = ["netns_guard"]

CFG = RenderConfig(family=4, node_name="node-a", cluster_cidr=("10.0.0.0/8",))
BACKENDS: tuple[XtablesBackend, ...] = ("legacy", "nft")


def tables(ns: str, backend: XtablesBackend, family: Family = 4) -> dict[str, dict[str, list[str]]]:
    """iptables-save of nat and filter, normalised: per table, chain -> rules in order
    (nft lists chains in creation order, legacy by name; counters and comments dropped)."""
    out: dict[str, dict[str, list[str]]] = {}
    for table in ("nat", "filter"):
        text = subprocess.run(
            [
                "nsenter",
                f"--net=/run/netns/{ns}",
                f"{'ip6' if family == 6 else 'ip'}tables-{backend}-save",
                "-t",
                table,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        chains: dict[str, list[str]] = {}
        for line in text.splitlines():
            if line.startswith(":"):
                chains.setdefault(line[1:].split(" ", 1)[0], [])
            elif line.startswith("-A "):
                chains.setdefault(line.split(" ", 2)[1], []).append(line)
        out[table] = dict(sorted(chains.items()))
    return out


def in_ns(ns: str, *argv: str) -> None:
    subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *argv], check=True, capture_output=True)


@pytest.fixture
def namespaces(netns_guard: None) -> Iterator[tuple[str, str]]:
    """Two namespaces: where partial syncs run, and where the reference full sync runs."""
    names = (f"kpt{secrets.token_hex(3)}sync", f"kpt{secrets.token_hex(3)}ref")
    created: list[str] = []
    try:
        for name in names:
            create_netns(name)
            created.append(name)
        yield names
    finally:
        for name in created:
            delete_netns(name)


def reference(ns: str, backend: XtablesBackend, view: View) -> dict[str, dict[str, list[str]]]:
    """A fresh engine's full sync of `view` (taking over whatever an earlier case left)."""
    SyncEngine(CFG, CommandRestorer(backend, netns=ns)).sync(view, None)
    return tables(ns, backend)


OPS = st.lists(
    st.lists(
        st.tuples(
            st.sampled_from(["scale", "add", "delete", "empty"]),
            st.integers(0, 9),
            st.integers(0, 5),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=3,
    ),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_syncs_leave_what_a_fresh_full_sync_writes(
    namespaces: tuple[str, str], backend: XtablesBackend
) -> None:
    work, ref = namespaces

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(steps=OPS)
    def case(steps: list[list[tuple[str, int, int, int]]]) -> None:
        view = cluster(6, 2, node_ports=True)
        engine = SyncEngine(CFG, CommandRestorer(backend, netns=work))
        engine.sync(view, None)
        for step in steps:
            changed = set()
            for op, idx, count, first in step:
                name = port_name(idx)
                if op == "delete":
                    view.pop(name, None)
                elif op == "add" or name not in view:
                    view[name] = service(idx, count, node_port=idx % 2 == 0)
                else:
                    view[name] = with_endpoints(view[name], 0 if op == "empty" else count, first)
                changed.add(name)
            result = engine.sync(view, changed)
            assert not result.full
        assert tables(work, backend) == reference(ref, backend, view)

    case()


class FailOnce:
    """Breaks the next payload with a rule jumping to a chain that does not exist, so the
    real iptables-restore refuses it."""

    def __init__(self, inner: CommandRestorer) -> None:
        self.inner = inner
        self.armed = False

    def apply(self, family: Family, payload: str, noflush: bool = True) -> None:
        if self.armed:
            self.armed = False
            payload = payload.replace("COMMIT", "-A KUBE-SERVICES -j KUBE-NO-SUCH-CHAIN\nCOMMIT", 1)
        self.inner.apply(family, payload, noflush)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_restore_keeps_old_rules_and_next_sync_recovers(
    namespaces: tuple[str, str], backend: XtablesBackend
) -> None:
    work, ref = namespaces
    restorer = FailOnce(CommandRestorer(backend, netns=work))
    engine = SyncEngine(CFG, restorer)  # type: ignore[arg-type]
    view = cluster(8, 3)
    engine.sync(view, None)
    before = tables(work, backend)
    a, b = port_name(1), port_name(2)
    view[a] = with_endpoints(view[a], 5, 1)
    del view[b]
    restorer.armed = True
    with pytest.raises(RestoreError) as failure:
        engine.sync(view, {a, b})
    assert failure.value.line is not None
    assert tables(work, backend) == before
    result = engine.sync(view, set())  # the caller's change set is gone; the engine kept it
    assert result.full and result.reason == "failure"
    assert tables(work, backend) == reference(ref, backend, view)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flushed_chains_are_detected_and_repaired(
    namespaces: tuple[str, str], backend: XtablesBackend
) -> None:
    work, ref = namespaces
    engine = SyncEngine(CFG, CommandRestorer(backend, netns=work))
    view = cluster(5, 2)
    engine.sync(view, None)
    tool = f"iptables-{backend}"
    in_ns(work, tool, "-w", "-t", "nat", "-F", "KUBE-SERVICES")
    in_ns(work, tool, "-w", "-t", "nat", "-X", "KUBE-PROXY-CANARY")
    in_ns(
        work,
        tool,
        "-w",
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-m",
        "comment",
        "--comment",
        "kubernetes service portals",
        "-j",
        "KUBE-SERVICES",
    )
    result = engine.sync(view, set())
    assert result.full and result.reason == "canary"
    assert result.jumps_inserted == 1
    assert tables(work, backend) == reference(ref, backend, view)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchanged_partial_sync_runs_no_restore(namespaces: tuple[str, str], backend: XtablesBackend) -> None:
    work, _ = namespaces
    engine = SyncEngine(CFG, CommandRestorer(backend, netns=work))
    view = cluster(3, 2)
    engine.sync(view, None)
    result = engine.sync(view, {port_name(0)})
    assert not result.full and result.restores == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_partial_syncs_and_flush_repair(namespaces: tuple[str, str], backend: XtablesBackend) -> None:
    work, ref = namespaces
    cfg = RenderConfig(family=6, node_name="node-a", cluster_cidr=("fd00:244::/48",))
    engine = SyncEngine(cfg, CommandRestorer(backend, netns=work))
    view = cluster6(4, 2)
    assert engine.sync(view, None).full
    view[port_name(1)] = (view[port_name(1)][0], view[port_name(1)][1][:1])
    del view[port_name(2)]
    assert not engine.sync(view, {port_name(1), port_name(2)}).full
    in_ns(work, f"ip6tables-{backend}", "-w", "-t", "nat", "-F", "KUBE-SERVICES")
    in_ns(work, f"ip6tables-{backend}", "-w", "-t", "nat", "-X", "KUBE-PROXY-CANARY")
    assert engine.sync(view, set()).reason == "canary"
    SyncEngine(cfg, CommandRestorer(backend, netns=ref)).sync(view, None)
    assert tables(work, backend, 6) == tables(ref, backend, 6)
