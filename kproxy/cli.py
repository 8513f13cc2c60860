"""The `kproxy` command. One function adds each subcommand's arguments, one runs it.

Exit codes: 0 done; 1 a runtime failure or a problem found (something `run` needs is
missing, cleanup left rules behind, no manifest found, objects skipped under --strict, an
--explain target that does not exist); 2 bad command line or configuration. Every
anticipated error is one line on stderr, never a traceback.

`kproxy --config=... --hostname-override=...` (kube-proxy's own argv, no subcommand) runs
`kproxy run`, so a DaemonSet can swap the image and keep its arguments.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO, cast

import yaml

from kproxy.backends.iptables.explain import explain
from kproxy.backends.iptables.render import render_snapshot
from kproxy.config import RenderConfig, render_config, sized
from kproxy.errors import ConfigError, KproxyError, ObjectError, StartupError
from kproxy.settings import Settings, add_run_arguments, effective_config, from_args
from kproxy.sources.files import load_paths
from kproxy.state.build import Snapshot, view
from kproxy.state.model import FAMILIES, Family, ServiceKey, in_family

Command = Callable[[argparse.Namespace], int]


def _cidr_list(text: str) -> tuple[str, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a CIDR") from None
    return tuple(out)


def _service_key(text: str) -> ServiceKey:
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAMESPACE/NAME")
    return ServiceKey(ns, name)


def add_dry_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dry-run",
        help="print the iptables-restore input for Services in manifest files",
        description=(
            "Render the rules kproxy would install on the node named by --node-name for the objects in the given files "
            "(Services, EndpointSlices or Endpoints, Nodes; YAML or JSON, multi-document or List) "
            "and print them as iptables-restore input for one family. Piped into iptables-restore "
            "in an empty network namespace, every service works. Skipped objects are reported "
            "on stderr, one line each."
        ),
    )
    p.add_argument(
        "-f",
        "--filename",
        dest="paths",
        action="append",
        required=True,
        metavar="PATH",
        help="manifest file or directory (repeatable; required); - reads standard input",
    )
    p.add_argument(
        "--node-name",
        "--hostname-override",
        dest="node_name",
        required=True,
        metavar="NAME",
        help="the node to render for (required): its endpoints are local, its Node object gives zone, "
        "pod CIDRs, addresses",
    )
    p.add_argument(
        "--ip-family",
        "--ip-families",
        dest="ip_family",
        type=_family_arg,
        default=None,
        metavar="4|6",
        help="address family to render (4 when not given; --explain shows both unless given)",
    )
    p.add_argument(
        "--cluster-cidr",
        type=_cidr_list,
        default=(),
        metavar="CIDR[,CIDR]",
        help="pod CIDR(s), at most one per family; traffic to a cluster IP from outside is masqueraded "
        "(default none)",
    )
    p.add_argument(
        "--masquerade-all", action="store_true", help="masquerade all traffic to cluster IPs (default off)"
    )
    p.add_argument(
        "--nodeport-addresses",
        type=_cidr_list,
        default=(),
        metavar="CIDR[,CIDR...]",
        help="accept node ports only on the Node's addresses inside these CIDRs (default every local address)",
    )
    p.add_argument(
        "--iptables-localhost-nodeports",
        dest="localhost_nodeports",
        type=_true_false,
        nargs="?",
        const=True,
        default=True,
        metavar="true|false",
        help="IPv4 node ports also answer on 127.0.0.1, as kube-proxy's (default true)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when any object was skipped (default off: skipped objects are only reported)",
    )
    p.add_argument(
        "--proxy-mode",
        choices=("iptables", "nftables"),
        default="iptables",
        help="print iptables-restore input (default) or an `nft -f` script",
    )
    p.add_argument(
        "--explain",
        type=_service_key,
        metavar="NAMESPACE/NAME",
        help="instead of rules, explain where traffic to this service goes and why",
    )
    p.set_defaults(func=cmd_dry_run, parser=p)


def _true_false(text: str) -> bool:
    if text.strip().lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return text.strip().lower() == "true"


def _family_arg(text: str) -> Family:
    if text.strip() not in ("4", "6"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 4 or 6")
    return 6 if text.strip() == "6" else 4


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("kproxy")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error shows this (sub)command's usage line, not the top level's."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kproxy",
        description="A Kubernetes service proxy: kube-proxy's iptables rules, health and metrics. "
        "`kproxy --config=... --hostname-override=...` (kube-proxy's arguments) means `kproxy run ...`.",
    )
    parser.add_argument("--version", action="version", version=f"kproxy {version()}")
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser),
    )
    add_dry_run(sub)
    add_run(sub)
    add_cleanup(sub)
    v = sub.add_parser(
        "version", help="print kproxy's version", description="Print kproxy's version and exit."
    )
    v.set_defaults(func=cmd_version, parser=v)
    return parser


def add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        usage="kproxy run [--config PATH] [--hostname-override NAME] [flags...]  (kproxy run -h lists them)",
        help="run the node agent: watch the cluster (or a manifest directory) and keep the rules in step",
        description="Watch Services, EndpointSlices and this Node, and program this node's "
        "iptables rules (or the userspace forwarder). Every kube-proxy flag is accepted; those naming "
        "something kproxy does not do (IPVS, profiling) are warned about. With --config the file wins "
        "over the flags mirroring its fields, except --hostname-override and the logging flags, as "
        "kube-proxy. Exits 1 with one line when something it needs is missing, 2 on a bad flag or file.",
    )
    add_run_arguments(p)
    p.set_defaults(func=cmd_run, parser=p)


def add_cleanup(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cleanup",
        help="remove every rule and chain kproxy (or kube-proxy) owns, in both families, and exit",
        description="Remove every rule and chain kproxy or kube-proxy created, on every iptables backend "
        "installed, in both families, then exit: 0 when done, 1 when a table could not be read or "
        "written (nothing is left half-written: run it again once the cause is fixed).",
    )
    p.set_defaults(func=cmd_cleanup, parser=p)


def cmd_version(args: argparse.Namespace) -> int:
    sys.stdout.write(f"kproxy {version()}\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from kproxy import startup
    from kproxy.agent import run_agent
    from kproxy.infra import log

    try:
        settings = from_args(args)
    except ConfigError as e:
        parser: argparse.ArgumentParser | None = getattr(args, "parser", None)
        if parser is not None:
            parser.print_usage(sys.stderr)
        _warn(sys.stderr, f"refusing to start: {e}")
        return 2
    if getattr(args, "write_config_to", None):
        for note in settings.warnings:
            _warn(sys.stderr, f"warning: {note}")
        return _write_config(settings, args.write_config_to)
    if _switch(args, "cleanup"):
        return cmd_cleanup(args)
    try:
        startup.preflight(settings)
    except StartupError as e:
        _warn(sys.stderr, str(e))
        return 1
    log.setup(settings.effective_log_level, fmt=settings.logging_format)
    for note in settings.warnings:
        log.warn("config_ignored", detail=note)
    try:
        startup.init_node(settings)
    except StartupError as e:
        log.error("startup_failed", error=str(e))
        _warn(sys.stderr, str(e))
        return 1
    if _switch(args, "init_only"):
        log.info("init_only_done", node=settings.node_name)
        return 0
    return run_agent(settings)


def _switch(args: argparse.Namespace, name: str) -> bool:
    value = getattr(args, name, None)
    if value is None:
        return False
    if str(value).lower() not in ("true", "false"):
        raise ConfigError(f"--{name.replace('_', '-')}", f"{value!r} is not true or false")
    return str(value).lower() == "true"


def _write_config(settings: Settings, path: str) -> int:
    """kube-proxy's --write-config-to: the effective configuration as YAML, then exit."""
    from kproxy.configz import go_duration

    text = yaml.safe_dump(effective_config(settings, dur=go_duration), sort_keys=False)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        _warn(sys.stderr, f"--write-config-to {path}: {e.strerror}")
        return 1
    sys.stderr.write(f"kproxy: wrote the configuration to {path}\n")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from kproxy import startup
    from kproxy.netfilter.cleanup import cleanup

    if not startup.has_cap_net_admin():
        _warn(sys.stderr, "cleanup: no CAP_NET_ADMIN, the tables cannot be read or changed: run as root")
        return 1
    try:
        startup.check_tools(Settings())
    except StartupError as e:
        _warn(sys.stderr, f"cleanup: {e}")
        return 1
    try:
        report = cleanup()
    except KproxyError as e:
        _warn(sys.stderr, f"cleanup failed: {e}")
        return 1
    sys.stderr.write(f"kproxy: {report.summary()}\n")
    return 0


def _warn(err: TextIO, text: str) -> None:
    err.write("kproxy: " + text.replace("\n", "\\n") + "\n")


def dry_run_configs(
    args: argparse.Namespace, snapshot: Snapshot, families: Sequence[Family]
) -> list[RenderConfig]:
    node = snapshot.node
    cfgs = []
    for family in families:
        cfgs.append(
            render_config(
                family,
                args.node_name,
                node_zone=node.zone if node else "",
                node_pod_cidrs=node.pod_cidrs if node else (),
                cluster_cidr=args.cluster_cidr,
                masquerade_all=args.masquerade_all,
                nodeport_addresses=args.nodeport_addresses,
                node_ips=node.addresses if node else (),
                primary_ips=node.addresses if node else (),
                localhost_nodeports=args.localhost_nodeports,
            )
        )
    return cfgs


def cmd_dry_run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    for family in FAMILIES:
        mine = [c for c in args.cluster_cidr if in_family(c, family)]
        if len(mine) > 1:
            _warn(
                err,
                f"--cluster-cidr: more than one IPv{family} CIDR ({', '.join(mine)}); give one per family",
            )
            return 2

    missing = [p for p in args.paths if p != "-" and not os.path.exists(p)]
    if missing:
        _warn(err, f"{missing[0]}: no such file or directory")
        return 1
    paths, stdin_file = _with_stdin(args.paths)
    ignored: list[ObjectError] = []
    try:
        objs, errors = load_paths(paths, warnings=ignored)
    finally:
        if stdin_file:
            os.unlink(stdin_file)
    for e in errors:
        _warn(err, f"skipped {e}")
    for w in ignored:
        _warn(err, f"warning: {w}")
    if not objs and not errors:
        _warn(err, f"no manifests found in {', '.join(args.paths)} (expected .yaml, .yml or .json files)")
        return 1
    snapshot = Snapshot.from_objects(objs, args.node_name)
    if snapshot.node is None:
        _warn(
            err, f"warning: no Node {args.node_name!r} in the input: no zone, no pod CIDRs, no node addresses"
        )
    if args.nodeport_addresses and snapshot.node is None:
        _warn(
            err, "warning: --nodeport-addresses needs the Node's addresses; node ports will not be captured"
        )

    skipped = 1 if args.strict and errors else 0
    if args.explain is not None:
        families: list[Family] = [args.ip_family] if args.ip_family else list(FAMILIES)
        cfgs = dry_run_configs(args, snapshot, families)
        if args.explain not in snapshot.services:
            out.write(_not_found(args.explain, snapshot, paths))
            return 1
        if args.proxy_mode == "nftables":
            from kproxy.backends.nftables.explain import nftables_objects

            out.write(explain(snapshot, args.explain, cfgs, nftables_objects))
        else:
            out.write(explain(snapshot, args.explain, cfgs))
        return skipped

    rendered: Family = args.ip_family or 4
    (cfg,) = dry_run_configs(args, snapshot, [rendered])
    ports = view(snapshot, args.node_name, rendered)
    # large-cluster mode (no endpoint comments) as the agent decides it, so the payload is what
    # `kproxy run` writes for the same objects
    cfg = sized(cfg, sum(len(eps) for _, eps in ports.values()))
    if args.proxy_mode == "nftables":
        from kproxy.backends.nftables.render import render_snapshot as nft_snapshot

        out.write(nft_snapshot(ports, cfg))
        return skipped
    out.write(render_snapshot(ports, cfg))
    return skipped


def _with_stdin(paths: Sequence[str]) -> tuple[list[str], str]:
    """`-f -` as kubectl: standard input, through a temporary file the loader can read."""
    if "-" not in paths:
        return list(paths), ""
    fd, name = tempfile.mkstemp(prefix="kproxy-stdin-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(sys.stdin.read())
    return [name if p == "-" else p for p in paths], name


def _raw_services(paths: Sequence[str]) -> dict[ServiceKey, dict[str, Any]]:
    """Every Service document in the files, as written (the parser drops headless ones)."""
    found: dict[ServiceKey, dict[str, Any]] = {}
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            from kproxy.sources.files import manifest_files

            files.extend(manifest_files(path))
        else:
            files.append(path)
    for name in files:
        try:
            with open(name, encoding="utf-8") as f:
                docs = list(yaml.safe_load_all(f))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        stack: list[Any] = docs
        while stack:
            doc = stack.pop()
            if isinstance(doc, dict) and isinstance(doc.get("items"), list):
                stack.extend(doc["items"])
            elif isinstance(doc, dict) and doc.get("kind") == "Service":
                meta = doc.get("metadata") or {}
                if isinstance(meta, dict) and meta.get("name"):
                    found[ServiceKey(str(meta.get("namespace") or "default"), str(meta["name"]))] = doc
    return found


def _not_found(key: ServiceKey, snapshot: Snapshot, paths: Sequence[str]) -> str:
    """Why `--explain KEY` has nothing to show: headless, ExternalName, or a typo (with suggestions)."""
    raw = _raw_services(paths)
    doc = raw.get(key)
    if doc is not None:
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        assert isinstance(spec, dict)
        if spec.get("type") == "ExternalName":
            return (
                f"service {key} is type ExternalName (a DNS alias to {spec.get('externalName', '?')}): "
                "no proxy rules exist for it\n"
            )
        if spec.get("clusterIP") == "None":
            return f"service {key} is headless (clusterIP: None): clients reach the pods directly, no proxy rules\n"
        return f"service {key} was skipped (see the errors above, or it is not for this proxy): no rules\n"
    keys = sorted(set(snapshot.services) | set(raw))
    close = [str(k) for k in keys if k.name == key.name and k != key]
    names = difflib.get_close_matches(key.name, sorted({k.name for k in keys} - {key.name}), n=3, cutoff=0.6)
    close += [str(k) for k in keys if k.name in names]
    close = close[:3]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"service {key} not found{hint}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args_list:
        parser.print_help(sys.stdout)
        return 0
    if args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version"):
        args_list.insert(0, "run")  # kube-proxy's argv: flags only
    args, extras = parser.parse_known_args(args_list)
    if extras:
        owner: argparse.ArgumentParser = getattr(args, "parser", parser)
        owner.error(f"unrecognized arguments: {' '.join(extras)}")
    func: Command = args.func
    try:
        return func(args)
    except ConfigError as e:
        _warn(sys.stderr, str(e))
        return 2
    except KproxyError as e:
        _warn(sys.stderr, str(e))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 1
