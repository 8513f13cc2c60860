"""The `kproxy` command. One function adds each subcommand's arguments, one runs it.

Exit codes: 0 done; 1 the command ran but found a problem (objects skipped under
--strict, an --explain target that does not exist); 2 bad command line (argparse).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from kproxy.backends.iptables.render import render_snapshot
from kproxy.config import RenderConfig, render_config
from kproxy.errors import ConfigError, KproxyError
from kproxy.explain import explain
from kproxy.settings import add_run_arguments, from_args
from kproxy.sources.files import load_paths
from kproxy.state.build import Snapshot, view
from kproxy.state.model import FAMILIES, Family, ServiceKey

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
        help="manifest file or directory (repeatable)",
    )
    p.add_argument(
        "--node-name",
        required=True,
        metavar="NAME",
        help="the node to render for: its endpoints are local, its Node object gives zone, pod CIDRs, addresses",
    )
    p.add_argument(
        "--ip-family",
        type=int,
        choices=FAMILIES,
        default=None,
        help="address family to render (default 4; --explain shows both unless given)",
    )
    p.add_argument(
        "--cluster-cidr",
        type=_cidr_list,
        default=(),
        metavar="CIDR[,CIDR]",
        help="pod CIDR(s), at most one per family; traffic to a cluster IP from outside is masqueraded",
    )
    p.add_argument("--masquerade-all", action="store_true", help="masquerade all traffic to cluster IPs")
    p.add_argument(
        "--nodeport-addresses",
        type=_cidr_list,
        default=(),
        metavar="CIDR[,CIDR...]",
        help="accept node ports only on the Node's addresses inside these CIDRs",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when any object was skipped")
    p.add_argument(
        "--explain",
        type=_service_key,
        metavar="NAMESPACE/NAME",
        help="instead of rules, explain where traffic to this service goes and why",
    )
    p.set_defaults(func=cmd_dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kproxy", description="A Kubernetes service proxy (kube-proxy's iptables rules)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_dry_run(sub)
    add_run(sub)
    add_cleanup(sub)
    return parser


def add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the node agent: watch the cluster (or a manifest directory) and keep the rules in step",
        description="Watch Services, EndpointSlices and this Node, and program this node's "
        "iptables rules (or the userspace forwarder). Flags are kube-proxy's; they override --config.",
    )
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)


def add_cleanup(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "cleanup",
        help="remove every rule and chain kproxy (or kube-proxy) owns, in both families, and exit",
    )
    p.set_defaults(func=cmd_cleanup)


def cmd_run(args: argparse.Namespace) -> int:
    from kproxy.agent import run_agent

    try:
        settings = from_args(args)
    except ConfigError as e:
        _warn(sys.stderr, f"refusing to start: {e}")
        return 2
    return run_agent(settings)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from kproxy.backends.iptables.cleanup import cleanup

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
            )
        )
    return cfgs


def cmd_dry_run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    for family in FAMILIES:
        mine = [c for c in args.cluster_cidr if (":" in c) == (family == 6)]
        if len(mine) > 1:
            _warn(
                err,
                f"--cluster-cidr: more than one IPv{family} CIDR ({', '.join(mine)}); give one per family",
            )
            return 2

    objs, errors = load_paths(args.paths)
    for e in errors:
        _warn(err, f"skipped {e}")
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
        out.write(explain(snapshot, args.explain, cfgs))
        if args.explain not in snapshot.services:
            return 1
        return skipped

    rendered: Family = args.ip_family or 4
    (cfg,) = dry_run_configs(args, snapshot, [rendered])
    out.write(render_snapshot(view(snapshot, args.node_name, rendered), cfg))
    return skipped


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    return func(args)
