"""kube-proxy's configuration as a kubeadm node holds it: every ConfigMap payload loads, with
kube-proxy's defaults for its zero values, warnings (not refusals) for what kproxy ignores, and
kube-proxy's precedence between the file and the flags."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.errors import ConfigError
from kproxy.settings import CONFIG_FIELDS, Settings, add_run_arguments, effective_config, from_args

DATA = Path(__file__).resolve().parents[1] / "data" / "kubeadm"
KUBEADM = sorted(p.name for p in DATA.glob("kubeadm-*.yaml"))
HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"


def settings_for(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return from_args(p.parse_args(argv))


def with_config(tmp_path: Path, body: str, *argv: str) -> Settings:
    cfg = tmp_path / "config.conf"
    cfg.write_text(HEADER + body)
    return settings_for(["--config", str(cfg), *argv])


def test_there_are_payloads_of_several_releases() -> None:
    assert len(KUBEADM) >= 4


KUBE_PROXY_DEFAULTS: dict[str, Any] = {
    "kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf",
    "proxy_mode": "iptables",
    "detect_local_mode": "ClusterCIDR",
    "healthz_bind_address": "0.0.0.0:10256",
    "metrics_bind_address": "127.0.0.1:10249",
    "sync_period": 30.0,
    "min_sync_period": 1.0,
    "config_sync_period": 900.0,
    "masquerade_bit": 14,
    "masquerade_all": False,
    "localhost_nodeports": True,
    "nodeport_addresses": (),
    "oom_score_adj": -999,
    "conntrack_max_per_core": 32768,
    "conntrack_min": 131072,
    "conntrack_tcp_established_timeout": 86400.0,
    "conntrack_tcp_close_wait_timeout": 3600.0,
    "conntrack_tcp_be_liberal": False,
    "conntrack_udp_timeout": 0.0,
    "conntrack_udp_stream_timeout": 0.0,
    "kube_api_qps": 5.0,
    "kube_api_burst": 10,
    "logging_format": "text",
    "verbosity": 0,
}


@pytest.mark.parametrize("name", KUBEADM)
def test_kubeadm_payload_loads_with_kube_proxy_defaults(name: str) -> None:
    s = settings_for(["--config", str(DATA / name), "--hostname-override", "Node-A"])
    got = {k: getattr(s, k) for k in KUBE_PROXY_DEFAULTS}
    assert got == KUBE_PROXY_DEFAULTS
    assert s.node_name == "node-a"  # lowered, as kube-proxy does
    assert s.cluster_cidr[0] == "10.244.0.0/16"
    assert s.warnings == ()  # kubeadm's own output: nothing to warn about


def test_dual_stack_payload_gives_one_cidr_per_family() -> None:
    s = settings_for(["--config", str(DATA / "kubeadm-1.31-dualstack.yaml")])
    assert s.cluster_cidr == ("10.244.0.0/16", "fd00:10:244::/56")


def test_operator_tuned_payload() -> None:
    """Every value an operator set is read; what kproxy cannot honour is named in one warning each."""
    s = settings_for(["--config", str(DATA / "operator-tuned-1.30.yaml")])
    assert (s.kube_api_qps, s.kube_api_burst) == (10.0, 20)
    assert s.conntrack_max_per_core == 0  # an explicit 0 means "leave nf_conntrack_max alone"
    assert s.conntrack_tcp_be_liberal is True
    assert (s.conntrack_tcp_established_timeout, s.conntrack_tcp_close_wait_timeout) == (7200.0, 1800.0)
    assert (s.conntrack_udp_timeout, s.conntrack_udp_stream_timeout) == (30.0, 120.0)
    assert (s.detect_local_mode, s.bridge_interface) == ("BridgeInterface", "cni0")
    assert (s.localhost_nodeports, s.masquerade_all, s.masquerade_bit) == (False, True, 12)
    assert (s.sync_period, s.min_sync_period) == (60.0, 2.0)
    assert s.metrics_bind_address == "0.0.0.0:10249"  # a bare IP gets the default port
    assert s.nodeport_addresses == ("primary",)
    assert (s.logging_format, s.verbosity) == ("json", 2)
    assert s.oom_score_adj == -999
    warned = "\n".join(s.warnings)
    assert len(s.warnings) == 3, warned
    assert "someFutureField: unknown field" in warned
    assert "ipvs.scheduler: kproxy has no IPVS mode" in warned
    assert "ipvs.strictARP: kproxy has no IPVS mode" in warned


@pytest.mark.parametrize(
    ("body", "attr", "value"),
    [
        ("iptables:\n  syncPeriod: 0s\n", "sync_period", 30.0),
        ("iptables:\n  syncPeriod: 10s\n", "sync_period", 10.0),
        ("syncPeriod: 7s\n", "sync_period", 7.0),
        ("detectLocalMode: ''\n", "detect_local_mode", "ClusterCIDR"),
        ("detectLocalMode: NodeCIDR\n", "detect_local_mode", "NodeCIDR"),
        (
            "detectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: veth\n",
            "interface_name_prefix",
            "veth",
        ),
        ("healthzBindAddress: ''\n", "healthz_bind_address", "0.0.0.0:10256"),
        ("healthzBindAddress: 127.0.0.1\n", "healthz_bind_address", "127.0.0.1:10256"),
        ("healthzBindAddress: '[::1]:9999'\n", "healthz_bind_address", "[::1]:9999"),
        ("bindAddress: '::'\n", "metrics_bind_address", "[::1]:10249"),
        ("iptables:\n  masqueradeBit: 0\n", "masquerade_bit", 0),
        ("iptables:\n  localhostNodePorts: false\n", "localhost_nodeports", False),
        ("iptables:\n  localhostNodePorts: null\n", "localhost_nodeports", True),
        ("conntrack:\n  tcpEstablishedTimeout: 0s\n", "conntrack_tcp_established_timeout", 0.0),
        ("conntrack:\n  min: 0\n", "conntrack_min", 0),
        ("oomScoreAdj: 0\n", "oom_score_adj", 0),
        ("clientConnection:\n  qps: 0\n", "kube_api_qps", 5.0),
        ("configSyncPeriod: 1m\n", "config_sync_period", 60.0),
        ("nodePortAddresses: [10.0.0.0/8, 'fd00::/64']\n", "nodeport_addresses", ("10.0.0.0/8", "fd00::/64")),
        ("logging:\n  format: json\n", "logging_format", "json"),
        ("featureGates:\n  SomeGate: true\n", "feature_gates", (("SomeGate", True),)),
    ],
)
def test_field_values(tmp_path: Path, body: str, attr: str, value: Any) -> None:
    assert getattr(with_config(tmp_path, body), attr) == value


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ("iptables:\n  masqueradeBit: 40\n", "iptables.masqueradeBit"),
        ("iptables:\n  masqueradeBit: fourteen\n", "iptables.masqueradeBit"),
        ("iptables: 5\n", "iptables"),
        ("iptables:\n  syncPeriod: soon\n", "iptables.syncPeriod"),
        ("clusterCIDR: 10.0.0.0/33\n", "clusterCIDR"),
        ("clusterCIDR: 10.0.0.0/8,10.1.0.0/16\n", "clusterCIDR"),
        ("healthzBindAddress: nowhere\n", "healthzBindAddress"),
        ("metricsBindAddress: 1.2.3.4:99999\n", "metricsBindAddress"),
        ("mode: fastest\n", "mode"),
        ("detectLocalMode: Magic\n", "detectLocalMode"),
        ("oomScoreAdj: -2000\n", "oomScoreAdj"),
        ("conntrack:\n  maxPerCore: -1\n", "conntrack.maxPerCore"),
        ("conntrack:\n  tcpBeLiberal: yes please\n", "conntrack.tcpBeLiberal"),
        ("nodePortAddresses: [primary, 10.0.0.0/8]\n", "nodePortAddresses"),
        ("hostnameOverride: [a]\n", "hostnameOverride"),
        ("bindAddress: node-a\n", "bindAddress"),
        ("logging:\n  format: xml\n", "logging.format"),
    ],
)
def test_wrong_types_and_impossible_values_name_the_field(tmp_path: Path, body: str, path: str) -> None:
    with pytest.raises(ConfigError, match=rf": {path}: "):
        with_config(tmp_path, body)


@pytest.mark.parametrize(
    ("body", "argv", "option"),
    [
        ("detectLocalMode: BridgeInterface\n", [], "--pod-bridge-interface"),
        ("detectLocalMode: InterfaceNamePrefix\n", [], "--pod-interface-name-prefix"),
        ("iptables:\n  syncPeriod: 1s\n  minSyncPeriod: 5s\n", [], "--iptables-min-sync-period"),
    ],
)
def test_cross_field_checks(tmp_path: Path, body: str, argv: list[str], option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        with_config(tmp_path, body, *argv)


def test_not_a_kube_proxy_configuration(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("apiVersion: v1\nkind: ConfigMap\n")
    with pytest.raises(ConfigError, match="expected apiVersion"):
        settings_for(["--config", str(cfg)])


@pytest.mark.parametrize(
    ("body", "warning"),
    [
        ("mode: ipvs\n", "kproxy has no ipvs mode; running in iptables mode"),
        ("enableProfiling: true\n", "enableProfiling: kproxy serves no /debug/pprof"),
        ("ipvs:\n  scheduler: rr\n", "ipvs.scheduler: kproxy has no IPVS mode"),
        ("iptables:\n  snatNodeInternalIP: true\n", "iptables.snatNodeInternalIP"),
        ("iptables:\n  surprise: 1\n", "iptables.surprise: unknown field"),
        ("featureGates:\n  Foo: false\n", "feature gate Foo=false"),
    ],
)
def test_what_kproxy_does_not_do_is_one_warning(tmp_path: Path, body: str, warning: str) -> None:
    s = with_config(tmp_path, body)
    assert len(s.warnings) == 1 and warning in s.warnings[0], s.warnings
    assert s.proxy_mode == "iptables"


def test_nftables_mode_is_taken(tmp_path: Path) -> None:
    s = with_config(tmp_path, "mode: nftables\n")
    assert s.proxy_mode == "nftables" and s.warnings == ()


def test_file_wins_over_flags_except_hostname_and_logging(tmp_path: Path) -> None:
    """cmd/kube-proxy/app/options.go: with --config the file replaces the flag values; only
    --hostname-override and the logging flags still apply (and kproxy's own flags, which
    have no field)."""
    s = with_config(
        tmp_path,
        "hostnameOverride: from-file\niptables:\n  minSyncPeriod: 2s\nclusterCIDR: 10.244.0.0/16\n",
        "--iptables-min-sync-period=500ms",
        "--cluster-cidr=10.9.0.0/16",
        "--hostname-override=From-Flag",
        "--v=4",
        "--logging-format=json",
        "--iptables-backend=legacy",
    )
    assert (s.min_sync_period, s.cluster_cidr) == (2.0, ("10.244.0.0/16",))
    assert s.node_name == "from-flag"
    assert (s.verbosity, s.logging_format, s.effective_log_level) == (4, "json", "DEBUG")
    assert s.iptables_backend == "legacy"
    assert any("--iptables-min-sync-period: ignored because --config" in w for w in s.warnings)
    assert any("--cluster-cidr: ignored because --config" in w for w in s.warnings)


def test_without_config_flags_apply() -> None:
    s = settings_for(
        [
            "--iptables-min-sync-period=500ms",
            "--masquerade-all",
            "--iptables-localhost-nodeports=false",
            "--detect-local-mode=InterfaceNamePrefix",
            "--pod-interface-name-prefix=veth",
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-be-liberal",
            "--oom-score-adj=-500",
            "--healthz-port=0",
            "--metrics-port=9999",
            "-v",
            "2",
            "--nodeport-addresses=primary",
        ]
    )
    assert s.min_sync_period == 0.5 and s.masquerade_all and not s.localhost_nodeports
    assert (s.detect_local_mode, s.interface_name_prefix) == ("InterfaceNamePrefix", "veth")
    assert (s.conntrack_max_per_core, s.conntrack_tcp_be_liberal, s.oom_score_adj) == (0, True, -500)
    assert (s.healthz_bind_address, s.metrics_bind_address) == ("", "127.0.0.1:9999")
    assert s.verbosity == 2 and s.nodeport_addresses == ("primary",)


def test_ipvs_flags_are_accepted_with_one_warning_each() -> None:
    s = settings_for(["--ipvs-scheduler=rr", "--ipvs-strict-arp", "--ipvs-sync-period=5s"])
    assert len(s.warnings) == 3 and all("IPVS" in w for w in s.warnings)


def test_written_config_loads_back_to_the_same_settings(tmp_path: Path) -> None:
    """--write-config-to writes what kproxy runs with, in kube-proxy's format."""
    s = settings_for(["--config", str(DATA / "operator-tuned-1.30.yaml"), "--hostname-override", "n1"])
    out = tmp_path / "written.yaml"
    out.write_text(yaml.safe_dump(effective_config(s)))
    again = settings_for(["--config", str(out)])
    assert again == s


def test_every_field_is_reachable_once() -> None:
    paths = [f.path for f in CONFIG_FIELDS]
    assert len(paths) == len(set(paths))


# Every flag of kube-proxy's cmd/kube-proxy/app/options.go (AddFlags and logsapi.AddFlags),
# each with a value kube-proxy would take.
KUBE_PROXY_FLAGS = [
    "--write-config-to=/tmp/x",
    "--cleanup=false",
    "--feature-gates=A=true",
    "--kubeconfig=/k",
    "--master=https://10.0.0.1:6443",
    "--kube-api-content-type=application/json",
    "--kube-api-burst=20",
    "--kube-api-qps=10",
    "--hostname-override=n",
    "--bind-address=10.0.0.5",
    "--healthz-bind-address=0.0.0.0:10256",
    "--metrics-bind-address=127.0.0.1:10249",
    "--bind-address-hard-fail",
    "--profiling=false",
    "--show-hidden-metrics-for-version=1.30",
    "--init-only=false",
    "--proxy-mode=iptables",
    "--iptables-masquerade-bit=14",
    "--masquerade-all=true",
    "--iptables-localhost-nodeports=true",
    "--iptables-sync-period=30s",
    "--iptables-min-sync-period=1s",
    "--ipvs-sync-period=30s",
    "--ipvs-min-sync-period=0s",
    "--ipvs-scheduler=rr",
    "--ipvs-exclude-cidrs=10.0.0.0/8",
    "--ipvs-strict-arp",
    "--ipvs-tcp-timeout=0s",
    "--ipvs-tcpfin-timeout=0s",
    "--ipvs-udp-timeout=0s",
    "--detect-local-mode=ClusterCIDR",
    "--pod-bridge-interface=cni0",
    "--pod-interface-name-prefix=veth",
    "--cluster-cidr=10.244.0.0/16",
    "--nodeport-addresses=10.0.0.0/8",
    "--oom-score-adj=-999",
    "--conntrack-max-per-core=32768",
    "--conntrack-min=131072",
    "--conntrack-tcp-timeout-established=24h0m0s",
    "--conntrack-tcp-timeout-close-wait=1h0m0s",
    "--conntrack-tcp-be-liberal=false",
    "--conntrack-udp-timeout=0s",
    "--conntrack-udp-timeout-stream=0s",
    "--config-sync-period=15m0s",
    "--healthz-port=10256",
    "--metrics-port=10249",
    "--v=2",
    "--vmodule=proxier=4",
    "--logging-format=text",
    "--log-flush-frequency=5s",
    "--log-json-split-stream=false",
    "--log-json-info-buffer-size=0",
    "--log-text-split-stream=false",
    "--log-text-info-buffer-size=0",
]


@pytest.mark.parametrize("flag", KUBE_PROXY_FLAGS)
def test_every_kube_proxy_flag_is_accepted(flag: str) -> None:
    settings_for([flag])


def test_all_of_kube_proxys_flags_together() -> None:
    s = settings_for(KUBE_PROXY_FLAGS)
    assert (s.bind_address, s.kube_api_qps, s.kube_api_burst) == ("10.0.0.5", 10.0, 20)
    assert (s.masquerade_all, s.bind_address_hard_fail, s.verbosity) == (True, True, 2)
