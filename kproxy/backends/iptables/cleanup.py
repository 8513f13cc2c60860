"""`kproxy cleanup`: remove every rule and chain kproxy (or kube-proxy) owns.

Pure part: from `iptables-save` text, a `--noflush` payload that deletes the jumps from
built-in chains into our chains, then flushes and deletes our chains. Only chains a
service proxy owns are touched: kubelet's (KUBE-FIREWALL, KUBE-KUBELET-CANARY,
KUBE-IPTABLES-HINT) and everybody else's stay.
"""

from __future__ import annotations

import shlex
import shutil
from typing import cast

from kproxy import log
from kproxy.backends.iptables.naming import OWNED_PREFIXES
from kproxy.backends.iptables.restore import BACKENDS, CommandRestorer, tool
from kproxy.backends.iptables.ruleset import Table
from kproxy.errors import RestoreError
from kproxy.state.model import FAMILIES

PROXY_CHAINS = frozenset(
    {
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
        "KUBE-PROXY-CANARY",
        "KUBE-PORTALS-CONTAINER",
        "KUBE-PORTALS-HOST",
        "KUBE-NODEPORT-CONTAINER",
        "KUBE-NODEPORT-HOST",
    }
)
TABLES = cast(tuple[Table, ...], ("nat", "filter", "mangle"))
"""mangle holds only kube-proxy's canary, but a clean switch must remove that too."""


def owned(chain: str) -> bool:
    return chain in PROXY_CHAINS or chain.startswith(OWNED_PREFIXES)


def cleanup_payload(save_text: str) -> str:
    """The restore input that removes our chains from the tables in `save_text`."""
    out: list[str] = []
    table = ""
    chains: list[str] = []
    unhook: list[str] = []
    for line in save_text.splitlines():
        if line.startswith("*"):
            table, chains, unhook = line[1:], [], []
        elif line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if owned(name):
                chains.append(name)
        elif line.startswith("-A "):
            args = shlex.split(line)
            chain = args[1]
            target = args[args.index("-j") + 1] if "-j" in args else ""
            if not owned(chain) and owned(target):
                unhook.append("-D " + line[3:])
        elif line == "COMMIT" and table and (chains or unhook):
            out.append(f"*{table}")
            out.extend(unhook)
            out.extend(f":{name} - [0:0]" for name in chains)
            out.extend(f"-X {name}" for name in chains)
            out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def cleanup(netns: str | None = None) -> int:
    """Clean both families on every backend installed; returns the number of chains removed."""
    removed = 0
    for backend in BACKENDS:
        if shutil.which(tool(backend, 4, "-save")) is None:
            continue
        restorer = CommandRestorer(backend, netns=netns)
        for family in FAMILIES:
            if shutil.which(tool(backend, family, "-save")) is None:
                continue
            for table in TABLES:
                try:
                    payload = cleanup_payload(restorer.save(family, table))
                except RestoreError:
                    continue
                if not payload:
                    continue
                restorer.apply(family, payload, noflush=True)
                count = payload.count("\n-X ")
                removed += count
                log.info("cleanup", backend=backend, family=family, table=table, chains_removed=count)
    return removed
