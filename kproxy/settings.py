"""Settings for `kproxy run` and `kproxy cleanup`: kube-proxy's flags and config file.

Precedence: built-in defaults, then the KubeProxyConfiguration file (`--config`), then
flags given on the command line. Every value is checked here, at start, so a typo is
refused with the option's name instead of surfacing as a broken rule an hour later.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
from dataclasses import dataclass, replace
from typing import Any

import yaml

from kproxy.errors import ConfigError

CONFIG_API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
CONFIG_KIND = "KubeProxyConfiguration"

# Fields of kube-proxy's KubeProxyConfiguration that kproxy accepts but does not use.
_IGNORED_CONFIG_FIELDS = frozenset(
    {
        "bindAddress",
        "bindAddressHardFail",
        "enableProfiling",
        "showHiddenMetricsForVersion",
        "ipvs",
        "nftables",
        "winkernel",
        "detectLocal",
        "oomScoreAdj",
        "conntrack",
        "configSyncPeriod",
        "portRange",
        "logging",
        "windowsRunAsService",
        "featureGates",
    }
)
_KNOWN_CONFIG_FIELDS = frozenset(
    {
        "apiVersion",
        "kind",
        "clientConnection",
        "hostnameOverride",
        "healthzBindAddress",
        "metricsBindAddress",
        "mode",
        "iptables",
        "detectLocalMode",
        "clusterCIDR",
        "nodePortAddresses",
        "syncPeriod",
        "minSyncPeriod",
    }
)
_PERIODS = {"syncPeriod": "sync_period", "minSyncPeriod": "min_sync_period"}
"""Accepted at the top level (newer kube-proxy) and under `iptables` (older), same meaning."""
_IPTABLES_FIELDS = frozenset(
    {"masqueradeAll", "masqueradeBit", "syncPeriod", "minSyncPeriod", "localhostNodePorts"}
)


@dataclass(frozen=True, slots=True)
class Settings:
    node_name: str = ""
    kubeconfig: str = ""
    master: str = ""
    manifests: str = ""
    """A directory of YAML manifests to serve instead of an API server."""
    proxy_mode: str = "iptables"
    cluster_cidr: tuple[str, ...] = ()
    detect_local_mode: str = "ClusterCIDR"
    masquerade_all: bool = False
    masquerade_bit: int = 14
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    full_sync_period: float = 3600.0
    nodeport_addresses: tuple[str, ...] = ()
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    iptables_backend: str = "auto"
    families: tuple[int, ...] = (4, 6)
    use_endpoints: bool = False
    """Watch legacy v1 Endpoints instead of EndpointSlices (old clusters)."""
    log_level: str = "INFO"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(option: str, text: str | float | int) -> float:
    """Go's duration syntax ("1s", "500ms", "1h30m"), which kube-proxy's flags and config use."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    elif isinstance(text, str):
        pos, seconds = 0, 0.0
        stripped = text.strip()
        for m in _DURATION.finditer(stripped):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if pos != len(stripped) or not stripped:
            raise ConfigError(option, f"{text!r} is not a duration such as 1s, 500ms or 1h30m")
    else:
        raise ConfigError(option, f"{text!r} is not a duration")
    if seconds < 0:
        raise ConfigError(option, "must not be negative")
    return seconds


def _cidrs(option: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        items = [str(v).strip() for v in value]
    else:
        raise ConfigError(option, f"{value!r} is not a list of CIDRs")
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(option, f"{item!r} is not a CIDR") from None
    return tuple(out)


def _bind_address(option: str, value: Any) -> str:
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError(option, f"{text!r} must be host:port")
    try:
        ipaddress.ip_address(host.strip("[]"))
        number = int(port)
    except ValueError:
        raise ConfigError(option, f"{text!r} must be an IP address and a port") from None
    if not 0 <= number <= 65535:
        raise ConfigError(option, f"port {number} is out of range")
    return text


def _choice(option: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(option, f"{value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _bool(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(option, f"{value!r} is not true or false")
    return value


def _masq_bit(option: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 31:
        raise ConfigError(option, f"{value!r} must be an integer from 0 to 31")
    return value


def load_config_file(path: str) -> dict[str, Any]:
    """Read a KubeProxyConfiguration into Settings field values."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError("--config", f"{path} does not hold a {CONFIG_KIND}")
    if doc.get("kind") != CONFIG_KIND or doc.get("apiVersion") != CONFIG_API_VERSION:
        raise ConfigError("--config", f"{path}: expected apiVersion {CONFIG_API_VERSION}, kind {CONFIG_KIND}")
    out: dict[str, Any] = {}
    for key, value in doc.items():
        opt = f"{path}: {key}"
        if key in _IGNORED_CONFIG_FIELDS or value is None or key in ("apiVersion", "kind"):
            continue
        if key not in _KNOWN_CONFIG_FIELDS:
            raise ConfigError(opt, "unknown field")
        if key == "clientConnection":
            if not isinstance(value, dict):
                raise ConfigError(opt, "must be a mapping")
            if value.get("kubeconfig"):
                out["kubeconfig"] = str(value["kubeconfig"])
        elif key == "hostnameOverride":
            out["node_name"] = str(value)
        elif key == "healthzBindAddress":
            out["healthz_bind_address"] = _bind_address(opt, value)
        elif key == "metricsBindAddress":
            out["metrics_bind_address"] = _bind_address(opt, value)
        elif key == "mode":
            out["proxy_mode"] = _choice(opt, value or "iptables", ("iptables", "userspace"))
        elif key == "detectLocalMode":
            out["detect_local_mode"] = _choice(opt, value, ("ClusterCIDR", "NodeCIDR"))
        elif key == "clusterCIDR":
            out["cluster_cidr"] = _cidrs(opt, value)
        elif key == "nodePortAddresses":
            out["nodeport_addresses"] = _nodeport_addresses(opt, value)
        elif key in _PERIODS:
            out[_PERIODS[key]] = parse_duration(opt, value)
        elif key == "iptables":
            if not isinstance(value, dict):
                raise ConfigError(opt, "must be a mapping")
            for ik, iv in value.items():
                iopt = f"{path}: iptables.{ik}"
                if iv is None:
                    continue
                if ik not in _IPTABLES_FIELDS:
                    raise ConfigError(iopt, "unknown field")
                if ik == "masqueradeAll":
                    out["masquerade_all"] = _bool(iopt, iv)
                elif ik == "masqueradeBit":
                    out["masquerade_bit"] = _masq_bit(iopt, iv)
                elif ik in _PERIODS:
                    out[_PERIODS[ik]] = parse_duration(iopt, iv)
    return out


def _nodeport_addresses(option: str, value: Any) -> tuple[str, ...]:
    # kube-proxy accepts the word "primary" for "the node's primary IPs": that is our default.
    if value == ["primary"] or value == "primary":
        return ()
    return _cidrs(option, value)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by `kproxy run` and `kproxy cleanup`, named as kube-proxy names them.

    Every default is None so that only flags actually given override the config file."""
    p.add_argument("--config", help="a KubeProxyConfiguration file")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config)")
    p.add_argument("--master", help="API server URL, overriding the kubeconfig's")
    p.add_argument("--manifests", help="serve a directory of YAML manifests instead of an API server")
    p.add_argument("--hostname-override", "--node-name", dest="node_name", help="this node's name")
    p.add_argument("--proxy-mode", choices=("iptables", "userspace"))
    p.add_argument("--cluster-cidr", help="pod CIDRs, comma separated (one per family)")
    p.add_argument("--detect-local-mode", choices=("ClusterCIDR", "NodeCIDR"))
    p.add_argument("--masquerade-all", action="store_const", const=True)
    p.add_argument("--iptables-masquerade-bit", type=int, dest="masquerade_bit")
    p.add_argument("--iptables-sync-period", dest="sync_period")
    p.add_argument("--iptables-min-sync-period", dest="min_sync_period")
    p.add_argument("--full-sync-period", help="force a full resync at least this often (default 1h)")
    p.add_argument("--nodeport-addresses", help="CIDRs whose node IPs accept node ports, comma separated")
    p.add_argument("--healthz-bind-address")
    p.add_argument("--metrics-bind-address")
    p.add_argument("--iptables-backend", choices=("auto", "legacy", "nft"))
    p.add_argument("--ip-families", help="families to program: 4, 6 or 4,6 (default both)")
    p.add_argument("--use-endpoints", action="store_const", const=True, help="watch legacy v1 Endpoints")
    p.add_argument("--feature-gates", help="accepted for compatibility; kproxy has no feature gates yet")
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def from_args(ns: argparse.Namespace) -> Settings:
    values: dict[str, Any] = load_config_file(ns.config) if getattr(ns, "config", None) else {}
    flag = {k: v for k, v in vars(ns).items() if v is not None}
    simple = (
        "kubeconfig",
        "master",
        "manifests",
        "node_name",
        "proxy_mode",
        "detect_local_mode",
        "log_level",
    )
    for key in simple:
        if key in flag:
            values[key] = flag[key]
    if "iptables_backend" in flag:
        values["iptables_backend"] = flag["iptables_backend"]
    if "masquerade_all" in flag:
        values["masquerade_all"] = True
    if "use_endpoints" in flag:
        values["use_endpoints"] = True
    if "masquerade_bit" in flag:
        values["masquerade_bit"] = _masq_bit("--iptables-masquerade-bit", flag["masquerade_bit"])
    if "cluster_cidr" in flag:
        values["cluster_cidr"] = _cidrs("--cluster-cidr", flag["cluster_cidr"])
    if "nodeport_addresses" in flag:
        values["nodeport_addresses"] = _nodeport_addresses("--nodeport-addresses", flag["nodeport_addresses"])
    for key, option in (
        ("sync_period", "--iptables-sync-period"),
        ("min_sync_period", "--iptables-min-sync-period"),
        ("full_sync_period", "--full-sync-period"),
    ):
        if key in flag:
            values[key] = parse_duration(option, flag[key])
    for key, option in (
        ("healthz_bind_address", "--healthz-bind-address"),
        ("metrics_bind_address", "--metrics-bind-address"),
    ):
        if key in flag:
            values[key] = _bind_address(option, flag[key])
    if "ip_families" in flag:
        fams = tuple(sorted({int(f) for f in flag["ip_families"].split(",") if f.strip() in ("4", "6")}))
        if not fams or any(f.strip() not in ("4", "6") for f in flag["ip_families"].split(",")):
            raise ConfigError("--ip-families", f"{flag['ip_families']!r} must be 4, 6 or 4,6")
        values["families"] = fams
    settings = replace(Settings(), **values)
    return validate(settings)


def validate(s: Settings) -> Settings:
    if s.sync_period <= 0:
        raise ConfigError("--iptables-sync-period", "must be greater than zero")
    if s.min_sync_period > s.sync_period:
        raise ConfigError("--iptables-min-sync-period", "must not exceed --iptables-sync-period")
    if not s.node_name:
        s = replace(s, node_name=socket.gethostname().lower())
    return s


__all__ = ["Settings", "add_run_arguments", "from_args", "load_config_file", "parse_duration", "validate"]
