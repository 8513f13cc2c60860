"""nftables mode reads the `nftables.*` config fields as kube-proxy does, and the
`iptables.*` ones only outside it (kube-proxy's v1alpha1 conversion picks by `mode`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kproxy.config import render_config
from kproxy.settings import Settings, add_run_arguments, from_args

HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
SECTIONS = (
    "iptables:\n  masqueradeBit: 5\n  masqueradeAll: true\n  syncPeriod: 40s\n  minSyncPeriod: 3s\n"
    "nftables:\n  masqueradeBit: 9\n  masqueradeAll: false\n  syncPeriod: 50s\n  minSyncPeriod: 7s\n"
)


def with_config(tmp_path: Path, body: str) -> Settings:
    cfg = tmp_path / "config.conf"
    cfg.write_text(HEADER + body)
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return from_args(p.parse_args(["--config", str(cfg)]))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("nftables", (9, False, 50.0, 7.0)),
        ("iptables", (5, True, 40.0, 3.0)),
        ("userspace", (5, True, 40.0, 3.0)),
        ("", (5, True, 40.0, 3.0)),
    ],
)
def test_the_mode_picks_the_section(tmp_path: Path, mode: str, expected: tuple[object, ...]) -> None:
    s = with_config(tmp_path, f"mode: {mode!r}\n" + SECTIONS)
    assert (s.masquerade_bit, s.masquerade_all, s.sync_period, s.min_sync_period) == expected
    assert s.warnings == ()


def test_nftables_defaults_apply_when_only_iptables_is_set(tmp_path: Path) -> None:
    """A config written for iptables mode, switched to nftables: kube-proxy's nftables
    defaults (bit 14, 30 s, 1 s), not the iptables values."""
    s = with_config(tmp_path, "mode: nftables\niptables:\n  masqueradeBit: 5\n  syncPeriod: 40s\n")
    assert (s.masquerade_bit, s.sync_period, s.min_sync_period) == (14, 30.0, 1.0)


def test_nftables_masquerade_bit_reaches_the_rules(tmp_path: Path) -> None:
    """The bit is the mark the nftables table sets and tests for masquerading."""
    from kproxy.backends.nftables.render import table_script

    s = with_config(tmp_path, "mode: nftables\nnftables:\n  masqueradeBit: 9\n")
    cfg = render_config(4, "node-a", masquerade_bit=s.masquerade_bit, cluster_cidr=("10.244.0.0/16",))
    script = table_script([], cfg)
    assert "meta mark or 0x200" in script and "0x4000" not in script


def test_explicit_zero_bit_is_kept(tmp_path: Path) -> None:
    """masqueradeBit is a pointer in kube-proxy: 0 is bit 0, not the default."""
    s = with_config(tmp_path, "mode: nftables\nnftables:\n  masqueradeBit: 0\n")
    assert s.masquerade_bit == 0
