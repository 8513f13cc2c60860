"""Settings for `kproxy run` (`kproxy cleanup` takes none): kube-proxy's flags and config file.

kube-proxy's rules, which a node switching images depends on:

- Defaults are kube-proxy's. In the config file a zero or empty value means "the default",
  as kube-proxy's defaulting does; for the fields kube-proxy holds as pointers (conntrack
  maxPerCore/min and timeouts, masqueradeBit, localhostNodePorts, oomScoreAdj) only a missing
  or null value does, and an explicit 0 keeps its meaning ("leave the kernel's value").
- Unknown fields are warned about one by one, not refused (kube-proxy decodes leniently).
  A known field asking for something kproxy does not do (an IPVS scheduler)
  gives one warning naming it. Wrong types and impossible values are refused with the path.
- The mode picks the section, as kube-proxy's v1alpha1 conversion does: in nftables mode the
  masquerade and sync-period fields come from `nftables.*`, in every other mode from
  `iptables.*`; the other section is ignored.
- With `--config` the file wins over the flags that mirror its fields; only
  `--hostname-override` and the logging flags still apply (cmd/kube-proxy/app/options.go).
  kproxy's own flags (`--manifests`, `--iptables-backend`, ...) have no field and always apply.

Both the file and the flags are read through tables (path or flag -> parser -> attribute),
so a field is added in one place and `--write-config-to` can write the same fields back.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import yaml

from kproxy.errors import ConfigError
from kproxy.state.model import FAMILIES, in_family

CONFIG_API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
CONFIG_KIND = "KubeProxyConfiguration"
DETECT_LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
PROXY_MODES = ("iptables", "nftables", "userspace")
UNSUPPORTED_MODES = ("ipvs", "kernelspace")
LOGGING_FORMATS = ("text", "json")
HEALTHZ_PORT = 10256
METRICS_PORT = 10249


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
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    masquerade_all: bool = False
    masquerade_bit: int = 14
    localhost_nodeports: bool = True
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    full_sync_period: float = 3600.0
    config_sync_period: float = 900.0
    nodeport_addresses: tuple[str, ...] = ()
    """CIDRs, or the single word "primary" (the Node's primary IPs)."""
    bind_address: str = "0.0.0.0"
    """kube-proxy's override of the node's primary IP; unspecified means "from the node"."""
    bind_address_hard_fail: bool = False
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    oom_score_adj: int | None = -999
    conntrack_max_per_core: int = 32768
    conntrack_min: int = 131072
    conntrack_tcp_established_timeout: float = 86400.0
    conntrack_tcp_close_wait_timeout: float = 3600.0
    conntrack_tcp_be_liberal: bool = False
    conntrack_udp_timeout: float = 0.0
    conntrack_udp_stream_timeout: float = 0.0
    kube_api_qps: float = 5.0
    kube_api_burst: int = 10
    kube_api_content_type: str = "application/vnd.kubernetes.protobuf"
    iptables_backend: str = "auto"
    userspace_tcp_engine: str = "raw"
    families: tuple[int, ...] = (4, 6)
    use_endpoints: bool = False
    """Watch legacy v1 Endpoints instead of EndpointSlices (old clusters)."""
    log_level: str = "INFO"
    verbosity: int = 0
    vmodule: str = ""
    logging_format: str = "text"
    feature_gates: tuple[tuple[str, bool], ...] = ()
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """What was accepted but not honoured (unknown fields, unsupported features): logged at start."""

    @property
    def effective_log_level(self) -> str:
        """--log-level when given, else kube-proxy's -v: 4 and up turns on kproxy's debug events."""
        if self.log_level != "INFO":
            return self.log_level
        return "DEBUG" if self.verbosity >= 4 else "INFO"


# ------------------------------------------------------------------ value parsers

Parser = Callable[[str, Any], Any]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(option: str, text: str | float | int) -> float:
    """Go's duration syntax ("1s", "500ms", "1h30m", "0"), which kube-proxy's flags and config use."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    elif isinstance(text, str):
        pos, seconds = 0, 0.0
        stripped = text.strip()
        if stripped == "0":
            return 0.0
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


def _cluster_cidrs(option: str, value: Any) -> tuple[str, ...]:
    cidrs = _cidrs(option, value)
    for fam in FAMILIES:
        mine = [c for c in cidrs if in_family(c, fam)]
        if len(mine) > 1:
            raise ConfigError(option, f"more than one IPv{fam} CIDR ({', '.join(mine)}); give one per family")
    return cidrs


def _nodeport_addresses(option: str, value: Any) -> tuple[str, ...]:
    """CIDRs, or "primary": passed on as the word; the renderer resolves it to the Node's IPs."""
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if isinstance(items, list) and "primary" in items:
        if len(items) != 1:
            raise ConfigError(option, "'primary' cannot be combined with CIDRs")
        return ("primary",)
    return _cidrs(option, value)


def _host_port(option: str, value: Any, default_port: int) -> str:
    """IP:port, or a bare IP to which kube-proxy appends the default port."""
    if not isinstance(value, str):
        raise ConfigError(option, f"{value!r} is not an IP:port string")
    text = value.strip()
    if not text:
        return ""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
        return f"[{ip}]:{default_port}" if ip.version == 6 else f"{ip}:{default_port}"
    except ValueError:
        pass
    host, sep, port = text.rpartition(":")
    try:
        if not sep:
            raise ValueError
        ipaddress.ip_address(host.strip("[]"))
        number = int(port)
    except ValueError:
        raise ConfigError(option, f"{text!r} must be an IP address and a port") from None
    if not 0 <= number <= 65535:
        raise ConfigError(option, f"port {number} is out of range")
    return text


def _healthz(option: str, value: Any) -> str:
    return _host_port(option, value, HEALTHZ_PORT)


def _metrics(option: str, value: Any) -> str:
    return _host_port(option, value, METRICS_PORT)


def _ip(option: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(option, f"{value!r} is not an IP address")
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ConfigError(option, f"{value!r} is not an IP address") from None


def _bool(option: str, value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(option, f"{value!r} is not true or false")
    return value


def _int_in(lo: int, hi: int) -> Parser:
    def parse(option: str, value: Any) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip().lstrip("="))
            except ValueError:
                raise ConfigError(option, f"{value!r} is not an integer") from None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(option, f"{value!r} must be an integer from {lo} to {hi}")
        return value

    return parse


def _float(option: str, value: Any) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        raise ConfigError(option, f"{value!r} is not a number") from None
    if not number >= 0:
        raise ConfigError(option, f"{value!r} must be a number >= 0")
    return number


def _str(option: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(option, f"{value!r} is not a string")
    return value.strip()


def _nonempty_str(option: str, value: Any) -> str:
    text = _str(option, value)
    if not text:
        raise ConfigError(option, "must not be empty")
    return text


def _node_name(option: str, value: Any) -> str:
    return _nonempty_str(option, value).lower()


def _choice(allowed: tuple[str, ...], unsupported: tuple[str, ...] = ()) -> Parser:
    def parse(option: str, value: Any) -> str:
        if value in allowed or value in unsupported:
            return str(value)
        raise ConfigError(option, f"{value!r} is not one of {', '.join(allowed + unsupported)}")

    return parse


def _mode(option: str, value: Any) -> str:
    return str(_choice(PROXY_MODES, UNSUPPORTED_MODES)(option, value))


def _families(option: str, value: Any) -> tuple[int, ...]:
    parts = [p.strip() for p in str(value).split(",")]
    if not parts or any(p not in ("4", "6") for p in parts):
        raise ConfigError(option, f"{value!r} must be 4, 6 or 4,6")
    return tuple(sorted({int(p) for p in parts}))


def _feature_gates(option: str, value: Any) -> tuple[tuple[str, bool], ...]:
    if isinstance(value, str):
        pairs: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in value.split(","))):
            key, sep, val = item.partition("=")
            if not sep:
                raise ConfigError(option, f"{item!r} must be Name=true or Name=false")
            pairs[key.strip()] = val.strip()
        value = pairs
    if not isinstance(value, dict):
        raise ConfigError(option, f"{value!r} is not a map of feature names to true/false")
    return tuple(sorted((str(k), _bool(f"{option}.{k}", v)) for k, v in value.items()))


def _any(option: str, value: Any) -> Any:
    return value


# ------------------------------------------------------------------ the config file


@dataclass(frozen=True, slots=True)
class Field:
    """One KubeProxyConfiguration field: where it is, how to read it, where it lands.

    `attr` empty: kproxy does not use it; `unsupported` says what a value other than the
    zero value would ask for, warned about once. `zero_is_default`: kube-proxy holds the
    field as a plain value, so its zero value means the default."""

    path: str
    parse: Parser
    attr: str = ""
    zero_is_default: bool = True
    unsupported: str = ""
    modes: frozenset[str] = frozenset()
    """The `mode` values under which kube-proxy reads the field (empty: every mode); under any
    other it is ignored silently, as kube-proxy's v1alpha1 conversion does."""


def _f(
    path: str,
    parse: Parser,
    attr: str = "",
    *,
    ptr: bool = False,
    unsupported: str = "",
    modes: frozenset[str] = frozenset(),
) -> Field:
    return Field(path, parse, attr, zero_is_default=not ptr, unsupported=unsupported, modes=modes)


_DUR = parse_duration
_NO_IPVS = "kproxy has no IPVS mode"
_NFT = frozenset({"nftables"})
_NOT_NFT = frozenset(PROXY_MODES + UNSUPPORTED_MODES) - _NFT
"""kube-proxy reads iptables.* masquerade and sync-period fields in every mode but nftables,
and nftables.* only in nftables mode."""
_NO_WIN = "kproxy does not run on Windows"

CONFIG_FIELDS: tuple[Field, ...] = (
    _f("featureGates", _feature_gates, "feature_gates"),
    _f("clientConnection.kubeconfig", _str, "kubeconfig"),
    _f("clientConnection.qps", _float, "kube_api_qps"),
    _f("clientConnection.burst", _int_in(0, 2**31 - 1), "kube_api_burst"),
    _f("clientConnection.contentType", _str, "kube_api_content_type"),
    _f("clientConnection.acceptContentTypes", _str),
    _f("logging.format", _choice(LOGGING_FORMATS), "logging_format"),
    _f("logging.verbosity", _int_in(0, 2**31 - 1), "verbosity"),
    _f("logging.vmodule", _any, "vmodule"),
    _f("logging.flushFrequency", _any),
    _f("logging.options", _any),
    _f("hostnameOverride", _node_name, "node_name"),
    _f("bindAddress", _ip, "bind_address"),
    _f("healthzBindAddress", _healthz, "healthz_bind_address"),
    _f("metricsBindAddress", _metrics, "metrics_bind_address"),
    _f("bindAddressHardFail", _bool, "bind_address_hard_fail"),
    _f("enableProfiling", _bool, unsupported="kproxy serves no /debug/pprof"),
    _f("showHiddenMetricsForVersion", _str, unsupported="kproxy has no hidden metrics"),
    _f("mode", _mode, "proxy_mode"),
    _f("iptables.masqueradeBit", _int_in(0, 31), "masquerade_bit", ptr=True, modes=_NOT_NFT),
    _f("iptables.masqueradeAll", _bool, "masquerade_all", modes=_NOT_NFT),
    _f("iptables.localhostNodePorts", _bool, "localhost_nodeports", ptr=True),
    _f("iptables.snatNodeInternalIP", _bool, unsupported="kproxy masquerades to the egress address"),
    _f("iptables.syncPeriod", _DUR, "sync_period", modes=_NOT_NFT),
    _f("iptables.minSyncPeriod", _DUR, "min_sync_period", modes=_NOT_NFT),
    _f("syncPeriod", _DUR, "sync_period"),
    _f("minSyncPeriod", _DUR, "min_sync_period"),
    _f("ipvs.syncPeriod", _DUR, unsupported=_NO_IPVS),
    _f("ipvs.minSyncPeriod", _DUR, unsupported=_NO_IPVS),
    _f("ipvs.scheduler", _str, unsupported=_NO_IPVS),
    _f("ipvs.excludeCIDRs", _cidrs, unsupported=_NO_IPVS),
    _f("ipvs.strictARP", _bool, unsupported=_NO_IPVS),
    _f("ipvs.tcpTimeout", _DUR, unsupported=_NO_IPVS),
    _f("ipvs.tcpFinTimeout", _DUR, unsupported=_NO_IPVS),
    _f("ipvs.udpTimeout", _DUR, unsupported=_NO_IPVS),
    _f("nftables.masqueradeBit", _int_in(0, 31), "masquerade_bit", ptr=True, modes=_NFT),
    _f("nftables.masqueradeAll", _bool, "masquerade_all", modes=_NFT),
    _f("nftables.syncPeriod", _DUR, "sync_period", modes=_NFT),
    _f("nftables.minSyncPeriod", _DUR, "min_sync_period", modes=_NFT),
    _f("winkernel.networkName", _str, unsupported=_NO_WIN),
    _f("winkernel.sourceVip", _str, unsupported=_NO_WIN),
    _f("winkernel.enableDSR", _bool, unsupported=_NO_WIN),
    _f("winkernel.rootHnsEndpointName", _str, unsupported=_NO_WIN),
    _f("winkernel.forwardHealthCheckVip", _bool, unsupported=_NO_WIN),
    _f("windowsRunAsService", _bool, unsupported=_NO_WIN),
    _f("detectLocalMode", _choice(DETECT_LOCAL_MODES), "detect_local_mode"),
    _f("detectLocal.bridgeInterface", _str, "bridge_interface"),
    _f("detectLocal.interfaceNamePrefix", _str, "interface_name_prefix"),
    _f("clusterCIDR", _cluster_cidrs, "cluster_cidr"),
    _f("nodePortAddresses", _nodeport_addresses, "nodeport_addresses"),
    _f("oomScoreAdj", _int_in(-1000, 1000), "oom_score_adj", ptr=True),
    _f("conntrack.maxPerCore", _int_in(0, 2**31 - 1), "conntrack_max_per_core", ptr=True),
    _f("conntrack.min", _int_in(0, 2**31 - 1), "conntrack_min", ptr=True),
    _f("conntrack.tcpEstablishedTimeout", _DUR, "conntrack_tcp_established_timeout", ptr=True),
    _f("conntrack.tcpCloseWaitTimeout", _DUR, "conntrack_tcp_close_wait_timeout", ptr=True),
    _f("conntrack.tcpBeLiberal", _bool, "conntrack_tcp_be_liberal"),
    _f("conntrack.udpTimeout", _DUR, "conntrack_udp_timeout"),
    _f("conntrack.udpStreamTimeout", _DUR, "conntrack_udp_stream_timeout"),
    _f("configSyncPeriod", _DUR, "config_sync_period"),
    _f("portRange", _str),
    _f("udpIdleTimeout", _DUR),  # older kube-proxy's userspace mode; in kubeadm's ConfigMaps until 1.26
)
_BY_PATH = {f.path: f for f in CONFIG_FIELDS}
_GROUPS = frozenset(p.split(".")[0] for p in _BY_PATH if "." in p)
_ALWAYS_WARN_MODES = frozenset(UNSUPPORTED_MODES)


def _is_zero(value: Any) -> bool:
    return isinstance(value, str | int | float | list | dict) and value in ("", 0, "0s", "0", [], {})


def _walk(doc: Mapping[str, Any], prefix: str, where: str, warnings: list[str]) -> list[tuple[str, Any]]:
    """Flatten a document into (path, value), warning once for each unknown field."""
    out: list[tuple[str, Any]] = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if not prefix and key in ("apiVersion", "kind"):
            continue
        if path in _BY_PATH:
            out.append((path, value))
        elif not prefix and key in _GROUPS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {path}", f"{value!r} is not a mapping")
            out.extend(_walk(value, f"{path}.", where, warnings))
        else:
            warnings.append(f"{where}: {path}: unknown field, ignored")
    return out


def load_config_file(path: str) -> dict[str, Any]:
    """Read a KubeProxyConfiguration into Settings field values (plus `warnings`)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML: {e}") from None
    return config_values(doc, path)


def config_values(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ConfigError("--config", f"{where} does not hold a {CONFIG_KIND}")
    if doc.get("kind") != CONFIG_KIND or doc.get("apiVersion") != CONFIG_API_VERSION:
        raise ConfigError(
            "--config", f"{where}: expected apiVersion {CONFIG_API_VERSION}, kind {CONFIG_KIND}"
        )
    warnings: list[str] = []
    out: dict[str, Any] = {}
    mode = doc.get("mode") or "iptables"
    for path, value in _walk(doc, "", where, warnings):
        spec = _BY_PATH[path]
        if value is None or (spec.zero_is_default and _is_zero(value)):
            continue
        parsed = spec.parse(f"{where}: {path}", value)
        if spec.modes and mode not in spec.modes:
            continue
        if spec.unsupported:
            warnings.append(f"{where}: {path}: {spec.unsupported}; the value {value!r} is ignored")
        elif spec.attr:
            out[spec.attr] = parsed
    out["warnings"] = tuple(warnings)
    return out


def effective_config(s: Settings, dur: Callable[[float], str] | None = None) -> dict[str, Any]:
    """The KubeProxyConfiguration these settings amount to (--write-config-to, /configz).

    `dur` writes a duration (kproxy.configz.go_duration writes them as Go does)."""

    def default_dur(seconds: float) -> str:
        return f"{seconds:g}s"

    write_dur = dur or default_dur

    def out_value(attr: str) -> Any:
        value = getattr(s, attr)
        if attr == "feature_gates":
            return dict(value)
        if attr in ("cluster_cidr",):
            return ",".join(value)
        if attr == "nodeport_addresses":
            return list(value) or None
        if isinstance(value, float) and attr not in ("kube_api_qps",):
            return write_dur(value)
        return value

    doc: dict[str, Any] = {"apiVersion": CONFIG_API_VERSION, "kind": CONFIG_KIND}
    for spec in CONFIG_FIELDS:
        if not spec.attr or spec.path in ("syncPeriod", "minSyncPeriod"):
            continue
        node = doc
        *parents, leaf = spec.path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = out_value(spec.attr)
    return doc


# ------------------------------------------------------------------ the command line


@dataclass(frozen=True, slots=True)
class Flag:
    """One command-line flag. `kind`: "config" (ignored when --config is given, as kube-proxy
    does), "always" (also with --config: hostname, logging, kproxy's own), "action"
    (read by the command, not a setting), or "unsupported" (accepted, one warning)."""

    names: tuple[str, ...]
    attr: str
    parse: Parser | None
    help: str
    default: str = ""
    kind: str = "config"
    switch: bool = False
    """A boolean flag: bare `--flag` is true, `--flag=false` is accepted (pflag style)."""
    metavar: str | None = None


def _flag(names: str, attr: str, parse: Parser | None, help: str, default: str = "", **kw: Any) -> Flag:
    split = tuple(names.split())
    return Flag(split, attr or split[0].lstrip("-").replace("-", "_"), parse, help, default, **kw)


FLAGS: tuple[Flag, ...] = (
    _flag(
        "--config",
        "config",
        None,
        "a KubeProxyConfiguration file; it wins over the flags mirroring its fields (as kube-proxy)",
        kind="action",
        metavar="PATH",
    ),
    _flag(
        "--write-config-to",
        "write_config_to",
        None,
        "write the effective configuration to PATH and exit",
        kind="action",
        metavar="PATH",
    ),
    _flag(
        "--cleanup",
        "cleanup",
        None,
        "remove every rule kproxy or kube-proxy made, then exit (as `kproxy cleanup`)",
        "false",
        kind="action",
        switch=True,
    ),
    _flag(
        "--init-only",
        "init_only",
        None,
        "do the privileged start-up steps (conntrack sysctls, oom_score_adj), then exit",
        "false",
        kind="action",
        switch=True,
    ),
    _flag(
        "--kubeconfig",
        "kubeconfig",
        _str,
        "kubeconfig file with the API server and credentials",
        "in-cluster config",
        metavar="PATH",
    ),
    _flag(
        "--master",
        "master",
        _str,
        "API server URL, overriding the kubeconfig's",
        kind="always",
        metavar="URL",
    ),
    _flag(
        "--manifests",
        "manifests",
        _str,
        "serve a directory of YAML manifests instead of an API server (kproxy)",
        kind="always",
        metavar="DIR",
    ),
    _flag(
        "--kube-api-content-type",
        "kube_api_content_type",
        _str,
        "content type of API requests (kproxy always speaks JSON)",
        "application/vnd.kubernetes.protobuf",
        metavar="TYPE",
    ),
    _flag(
        "--kube-api-qps",
        "kube_api_qps",
        _float,
        "API request rate (the Python client has no limiter; kproxy only lists and watches)",
        "5",
    ),
    _flag("--kube-api-burst", "kube_api_burst", _int_in(0, 2**31 - 1), "API request burst", "10"),
    _flag(
        "--hostname-override --node-name",
        "node_name",
        _node_name,
        "the name of this node's Node object",
        "the hostname",
        kind="always",
        metavar="NAME",
    ),
    _flag(
        "--bind-address",
        "bind_address",
        _ip,
        "this node's primary IP, overriding the Node object's",
        "0.0.0.0 (from the node)",
        metavar="IP",
    ),
    _flag(
        "--healthz-bind-address",
        "healthz_bind_address",
        _healthz,
        "IP:port of /healthz and /livez; empty disables",
        "0.0.0.0:10256",
        metavar="IP:PORT",
    ),
    _flag(
        "--metrics-bind-address",
        "metrics_bind_address",
        _metrics,
        "IP:port of /metrics; empty disables",
        "127.0.0.1:10249",
        metavar="IP:PORT",
    ),
    _flag(
        "--healthz-port",
        "healthz_port",
        _int_in(0, 65535),
        "deprecated: port of /healthz, 0 disables",
        "10256",
        metavar="PORT",
    ),
    _flag(
        "--metrics-port",
        "metrics_port",
        _int_in(0, 65535),
        "deprecated: port of /metrics, 0 disables",
        "10249",
        metavar="PORT",
    ),
    _flag(
        "--bind-address-hard-fail",
        "bind_address_hard_fail",
        _bool,
        "exit when a server port cannot be bound (kproxy always refuses to start on a port in use)",
        "false",
        switch=True,
    ),
    _flag(
        "--profiling",
        "profiling",
        _bool,
        "kube-proxy's pprof handler (not in kproxy)",
        "false",
        kind="unsupported",
        switch=True,
    ),
    _flag(
        "--show-hidden-metrics-for-version",
        "show_hidden",
        _str,
        "kube-proxy's hidden metrics (none in kproxy)",
        kind="unsupported",
    ),
    _flag(
        "--proxy-mode",
        "proxy_mode",
        _mode,
        "iptables, nftables or userspace (ipvs: warned, iptables used)",
        "iptables",
        metavar="MODE",
    ),
    _flag(
        "--iptables-masquerade-bit",
        "masquerade_bit",
        _int_in(0, 31),
        "fwmark bit of packets to masquerade, 0-31",
        "14",
        metavar="BIT",
    ),
    _flag(
        "--masquerade-all",
        "masquerade_all",
        _bool,
        "masquerade all traffic sent to cluster IPs",
        "false",
        switch=True,
    ),
    _flag(
        "--iptables-localhost-nodeports",
        "localhost_nodeports",
        _bool,
        "IPv4 node ports also answer on 127.0.0.1",
        "true",
        switch=True,
    ),
    _flag(
        "--iptables-sync-period",
        "sync_period",
        parse_duration,
        "longest time between syncs",
        "30s",
        metavar="DURATION",
    ),
    _flag(
        "--iptables-min-sync-period",
        "min_sync_period",
        parse_duration,
        "shortest time between syncs",
        "1s",
        metavar="DURATION",
    ),
    _flag(
        "--full-sync-period",
        "full_sync_period",
        parse_duration,
        "rewrite every rule at least this often (kproxy)",
        "1h",
        kind="always",
        metavar="DURATION",
    ),
    _flag("--ipvs-sync-period", "", parse_duration, "IPVS mode (not in kproxy)", kind="unsupported"),
    _flag("--ipvs-min-sync-period", "", parse_duration, "IPVS mode (not in kproxy)", kind="unsupported"),
    _flag("--ipvs-scheduler", "", _str, "IPVS mode (not in kproxy)", kind="unsupported"),
    _flag("--ipvs-exclude-cidrs", "", _str, "IPVS mode (not in kproxy)", kind="unsupported"),
    _flag(
        "--ipvs-strict-arp",
        "",
        _bool,
        "IPVS mode (not in kproxy)",
        "false",
        kind="unsupported",
        switch=True,
    ),
    _flag("--ipvs-tcp-timeout", "", parse_duration, "IPVS mode (not in kproxy)", kind="unsupported"),
    _flag("--ipvs-tcpfin-timeout", "", parse_duration, "IPVS mode (not in kproxy)", kind="unsupported"),
    _flag("--ipvs-udp-timeout", "", parse_duration, "IPVS mode (not in kproxy)", kind="unsupported"),
    _flag(
        "--detect-local-mode",
        "detect_local_mode",
        _choice(DETECT_LOCAL_MODES),
        "how pod traffic is recognised: " + ", ".join(DETECT_LOCAL_MODES),
        "ClusterCIDR",
        metavar="MODE",
    ),
    _flag(
        "--pod-bridge-interface",
        "bridge_interface",
        _str,
        "with BridgeInterface: traffic from this bridge is pod traffic",
        metavar="NAME",
    ),
    _flag(
        "--pod-interface-name-prefix",
        "interface_name_prefix",
        _str,
        "with InterfaceNamePrefix: traffic from interfaces named so is pod traffic",
        metavar="PREFIX",
    ),
    _flag(
        "--cluster-cidr",
        "cluster_cidr",
        _cluster_cidrs,
        "pod CIDRs, one per family, comma separated",
        "none",
        metavar="CIDR[,CIDR]",
    ),
    _flag(
        "--nodeport-addresses",
        "nodeport_addresses",
        _nodeport_addresses,
        "CIDRs whose node IPs take node ports, or 'primary'",
        "all local addresses",
        metavar="CIDR,...",
    ),
    _flag(
        "--oom-score-adj",
        "oom_score_adj",
        _int_in(-1000, 1000),
        "oom_score_adj of the process, -1000 to 1000",
        "-999",
        metavar="N",
    ),
    _flag(
        "--conntrack-max-per-core",
        "conntrack_max_per_core",
        _int_in(0, 2**31 - 1),
        "nf_conntrack_max per CPU; 0 leaves the limit (and --conntrack-min) alone",
        "32768",
        metavar="N",
    ),
    _flag(
        "--conntrack-min",
        "conntrack_min",
        _int_in(0, 2**31 - 1),
        "lowest nf_conntrack_max to set",
        "131072",
        metavar="N",
    ),
    _flag(
        "--conntrack-tcp-timeout-established",
        "conntrack_tcp_established_timeout",
        parse_duration,
        "nf_conntrack_tcp_timeout_established; 0 leaves it",
        "24h0m0s",
        metavar="DURATION",
    ),
    _flag(
        "--conntrack-tcp-timeout-close-wait",
        "conntrack_tcp_close_wait_timeout",
        parse_duration,
        "nf_conntrack_tcp_timeout_close_wait; 0 leaves it",
        "1h0m0s",
        metavar="DURATION",
    ),
    _flag(
        "--conntrack-tcp-be-liberal",
        "conntrack_tcp_be_liberal",
        _bool,
        "set nf_conntrack_tcp_be_liberal to 1",
        "false",
        switch=True,
    ),
    _flag(
        "--conntrack-udp-timeout",
        "conntrack_udp_timeout",
        parse_duration,
        "nf_conntrack_udp_timeout; 0 leaves it",
        "0s",
        metavar="DURATION",
    ),
    _flag(
        "--conntrack-udp-timeout-stream",
        "conntrack_udp_stream_timeout",
        parse_duration,
        "nf_conntrack_udp_timeout_stream; 0 leaves it",
        "0s",
        metavar="DURATION",
    ),
    _flag(
        "--config-sync-period",
        "config_sync_period",
        parse_duration,
        "how often the API state is re-read in full",
        "15m0s",
        metavar="DURATION",
    ),
    _flag(
        "--feature-gates",
        "feature_gates",
        _feature_gates,
        "Name=true,... (accepted; kproxy has no feature gates)",
        metavar="K=V,...",
    ),
    _flag(
        "-v --v",
        "verbosity",
        _int_in(0, 2**31 - 1),
        "log verbosity; 4 or more logs kproxy's debug events",
        "0",
        kind="always",
        metavar="N",
    ),
    _flag(
        "--vmodule",
        "vmodule",
        _str,
        "per-module verbosity (accepted; kproxy applies -v to all)",
        kind="always",
        metavar="PATTERN=N,...",
    ),
    _flag(
        "--logging-format",
        "logging_format",
        _choice(LOGGING_FORMATS),
        "text (logfmt) or json",
        "text",
        kind="always",
        metavar="FORMAT",
    ),
    _flag(
        "--log-flush-frequency",
        "log_flush",
        parse_duration,
        "accepted; kproxy writes each line at once",
        "5s",
        kind="always",
        metavar="DURATION",
    ),
    _flag(
        "--log-json-split-stream",
        "",
        _bool,
        "accepted; kproxy logs to stderr",
        "false",
        kind="always",
        switch=True,
    ),
    _flag(
        "--log-json-info-buffer-size",
        "",
        _str,
        "accepted; kproxy does not buffer",
        "0",
        kind="always",
    ),
    _flag(
        "--log-text-split-stream",
        "",
        _bool,
        "accepted; kproxy logs to stderr",
        "false",
        kind="always",
        switch=True,
    ),
    _flag(
        "--log-text-info-buffer-size",
        "",
        _str,
        "accepted; kproxy does not buffer",
        "0",
        kind="always",
    ),
    _flag(
        "--log-level",
        "log_level",
        _choice(("DEBUG", "INFO", "WARNING", "ERROR")),
        "kproxy's own log level, overriding -v",
        "INFO",
        kind="always",
        metavar="LEVEL",
    ),
    _flag(
        "--iptables-backend",
        "iptables_backend",
        _choice(("auto", "legacy", "nft")),
        "legacy or nft; auto follows the rules already on the host (kproxy)",
        "auto",
        kind="always",
    ),
    _flag(
        "--userspace-tcp-engine",
        "userspace_tcp_engine",
        _choice(("raw", "protocol")),
        "userspace mode's TCP forwarder: raw sockets and splice, or uvloop transports (kproxy)",
        "raw",
        kind="always",
    ),
    _flag(
        "--ip-families --ip-family",
        "families",
        _families,
        "families to program: 4, 6 or 4,6 (kproxy)",
        "4,6",
        kind="always",
        metavar="4|6|4,6",
    ),
    _flag(
        "--use-endpoints",
        "use_endpoints",
        _bool,
        "watch legacy v1 Endpoints, not EndpointSlices (kproxy)",
        "false",
        kind="always",
        switch=True,
    ),
)
_SETTINGS_FIELDS = frozenset(f.name for f in fields(Settings))


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Every kube-proxy flag (and kproxy's own), each with its help and default.

    Every argparse default is None so that only flags actually given are seen."""
    for flag in FLAGS:
        help_text = f"{flag.help} (default {flag.default})" if flag.default else flag.help
        if flag.switch:
            p.add_argument(
                *flag.names, dest=flag.attr, nargs="?", const="true", metavar="true|false", help=help_text
            )
        else:
            p.add_argument(*flag.names, dest=flag.attr, metavar=flag.metavar or "VALUE", help=help_text)


def _flag_name(flag: Flag) -> str:
    return max(flag.names, key=len)


def from_args(ns: argparse.Namespace) -> Settings:
    """Settings from parsed flags and the --config file, kube-proxy's precedence applied."""
    given = {k: v for k, v in vars(ns).items() if v is not None}
    config_path = given.get("config")
    values: dict[str, Any] = load_config_file(config_path) if config_path else {"warnings": ()}
    warnings = list(values.pop("warnings"))
    seen_unsupported: set[str] = set()
    for flag in FLAGS:
        if flag.attr not in given or flag.kind == "action" or flag.parse is None:
            continue
        name = _flag_name(flag)
        parsed = flag.parse(name, given[flag.attr])
        if flag.kind == "unsupported":
            if name not in seen_unsupported:
                seen_unsupported.add(name)
                warnings.append(f"{name}: {flag.help}; ignored")
        elif config_path and flag.kind == "config":
            warnings.append(f"{name}: ignored because --config is given (as kube-proxy)")
        elif flag.attr in ("healthz_port", "metrics_port"):
            continue
        elif flag.attr in _SETTINGS_FIELDS:
            values[flag.attr] = parsed
    if not config_path:
        for attr, port_attr in (
            ("healthz_bind_address", "healthz_port"),
            ("metrics_bind_address", "metrics_port"),
        ):
            if port_attr in given:
                port = _int_in(0, 65535)(f"--{port_attr.replace('_', '-')}", given[port_attr])
                current = values.get(attr, getattr(Settings(), attr))
                host = (
                    current.rpartition(":")[0]
                    if current
                    else ("0.0.0.0" if "healthz" in attr else "127.0.0.1")
                )
                values[attr] = f"{host}:{port}" if port else ""
    settings = replace(Settings(), **values)
    return validate(settings, warnings)


def validate(s: Settings, warnings: list[str] | None = None) -> Settings:
    """Cross-field checks and defaults that depend on other fields, as kube-proxy's validation."""
    notes = list(warnings or ())
    if s.sync_period <= 0:
        raise ConfigError("--iptables-sync-period", "must be greater than zero")
    if s.min_sync_period > s.sync_period:
        raise ConfigError("--iptables-min-sync-period", "must not exceed --iptables-sync-period")
    if s.detect_local_mode == "BridgeInterface" and not s.bridge_interface:
        raise ConfigError("--pod-bridge-interface", "must be set when --detect-local-mode is BridgeInterface")
    if s.detect_local_mode == "InterfaceNamePrefix" and not s.interface_name_prefix:
        raise ConfigError(
            "--pod-interface-name-prefix", "must be set when --detect-local-mode is InterfaceNamePrefix"
        )
    if s.proxy_mode in _ALWAYS_WARN_MODES:
        notes.append(f"mode {s.proxy_mode}: kproxy has no {s.proxy_mode} mode; running in iptables mode")
        s = replace(s, proxy_mode="iptables")
    if s.feature_gates:
        notes.extend(
            f"feature gate {k}={str(v).lower()}: kproxy has no feature gates; ignored"
            for k, v in s.feature_gates
        )
    if s.kube_api_content_type not in ("application/vnd.kubernetes.protobuf", "application/json"):
        notes.append(
            f"kube API content type {s.kube_api_content_type!r}: kproxy speaks JSON to the API server"
        )
    if s.vmodule:
        notes.append("--vmodule: accepted; kproxy applies -v to every module")
    if ipaddress.ip_address(s.bind_address).version == 6:
        if s.healthz_bind_address == "0.0.0.0:10256":
            s = replace(s, healthz_bind_address="[::]:10256")
        if s.metrics_bind_address == "127.0.0.1:10249":
            s = replace(s, metrics_bind_address="[::1]:10249")
    if not s.node_name:
        s = replace(s, node_name=socket.gethostname().lower())
    return replace(s, warnings=tuple(notes))


def bind_override(s: Settings) -> str:
    """--bind-address as a node IP, or "" when it is the unspecified default."""
    ip = ipaddress.ip_address(s.bind_address)
    return "" if ip.is_unspecified else str(ip)


__all__ = [
    "CONFIG_FIELDS",
    "FLAGS",
    "Settings",
    "add_run_arguments",
    "bind_override",
    "config_values",
    "effective_config",
    "from_args",
    "load_config_file",
    "parse_duration",
    "validate",
]
