"""Flags and KubeProxyConfiguration: good values land, bad ones are refused by name."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kproxy.errors import ConfigError
from kproxy.settings import add_run_arguments, from_args, parse_duration


def settings_for(argv: list[str]):  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return from_args(p.parse_args(argv))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("500ms", 0.5), ("1h30m", 5400.0), ("2m3.5s", 123.5), (30, 30.0)],
)
def test_go_durations(text: str | int, seconds: float) -> None:
    assert parse_duration("--x", text) == seconds


@pytest.mark.parametrize("text", ["", "5", "1x", "s1", "-1s", "1s junk"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--iptables-sync-period"):
        settings_for([f"--iptables-sync-period={text}"])


def test_config_file_wins_over_its_flags(tmp_path: Path) -> None:
    """As kube-proxy: with --config, flags mirroring its fields are ignored (with a warning)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
        "kind: KubeProxyConfiguration\n"
        "mode: iptables\n"
        "clusterCIDR: 10.244.0.0/16,fd00:10:244::/56\n"
        "hostnameOverride: node-a\n"
        "iptables:\n  masqueradeBit: 12\n  syncPeriod: 10s\n  minSyncPeriod: 2s\n"
        "conntrack:\n  maxPerCore: 32768\n"
    )
    s = settings_for(["--config", str(cfg), "--iptables-min-sync-period", "500ms"])
    assert s.node_name == "node-a"
    assert s.cluster_cidr == ("10.244.0.0/16", "fd00:10:244::/56")
    assert (s.masquerade_bit, s.sync_period, s.min_sync_period) == (12, 10.0, 2.0)
    assert any("--iptables-min-sync-period" in w for w in s.warnings)


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ("mode: bogus\n", "mode"),
        ("iptables:\n  masqueradeBit: 40\n", "iptables.masqueradeBit"),
        ("clusterCIDR: 10.0.0.0/33\n", "clusterCIDR"),
        ("healthzBindAddress: nowhere\n", "healthzBindAddress"),
        ("iptables:\n  syncPeriod: 5\n  minSyncPeriod: 9\n", "--iptables-min-sync-period"),
    ],
)
def test_bad_config_values_are_refused_naming_the_field(tmp_path: Path, body: str, names: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n" + body)
    with pytest.raises(ConfigError, match=names):
        settings_for(["--config", str(cfg)])


def test_min_sync_period_may_not_exceed_sync_period() -> None:
    with pytest.raises(ConfigError, match="--iptables-min-sync-period"):
        settings_for(["--iptables-sync-period", "1s", "--iptables-min-sync-period", "5s"])
