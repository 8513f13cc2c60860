"""Adopting chains already in the kernel: what makes a takeover from kube-proxy rewrite nothing.

A chain the kernel already holds with exactly the rules we want need not be written. To
know, both sides are brought to one canonical form, because `iptables-save` prints a rule
differently from how it was written: basic matches (-s -d -p -i -o) first, host masks
spelled out (/32, /128), comments quoted only when needed, MARK's --or-mark as
--set-xmark X/X, `recent` with its default --mask and --rsource, and a statistic
probability as the kernel's fixed-point value. The canonical form keeps what the kernel
keeps and nothing else, so equal forms mean equal rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kproxy.state.model import Family

Canonical = tuple[object, ...]

# iptables-save quotes with double quotes and escapes nothing else our rules can hold;
# one scan per rule is ten times cheaper than shlex.
_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


def _tokens(line: str) -> list[str]:
    return [
        quoted.replace('\\"', '"') if quoted or bare == "" else bare for quoted, bare in _TOKEN.findall(line)
    ]


_BASIC = frozenset({"-s", "--source", "-d", "--destination", "-p", "--protocol", "-i", "-o"})
_BASIC_NAME = {"--source": "-s", "--destination": "-d", "--protocol": "-p"}
_FULL_MASK = {4: "255.255.255.255", 6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}


def _host(value: str, family: Family) -> str:
    if family == 4 and value.endswith("/32"):
        return value[:-3]
    if family == 6 and value.endswith("/128"):
        return value[:-4]
    return value


def _mark(option: str, value: str) -> tuple[str, str]:
    if option == "--or-mark":
        return "--set-xmark", f"{int(value, 0):#x}/{int(value, 0):#x}"
    if option == "--xor-mark":
        return "--set-xmark", f"{int(value, 0):#x}/0x0"
    if option == "--set-mark":
        mark, _, mask = value.partition("/")
        return "--set-xmark", f"{int(mark, 0):#x}/{int(mask or '0xffffffff', 0):#x}"
    if option == "--set-xmark":
        mark, _, mask = value.partition("/")
        return "--set-xmark", f"{int(mark, 0):#x}/{int(mask or '0xffffffff', 0):#x}"
    return option, value


def _block(name: str, opts: list[tuple[str, tuple[str, ...]]], family: Family) -> Canonical:
    """One match or target: its name and its options, order-insensitive, defaults filled."""
    out: dict[str, tuple[str, ...]] = {}
    for option, values in opts:
        if name == "statistic" and option == "--probability":
            values = (str(round(float(values[0]) * 0x80000000)),)
        elif name == "MARK":
            option, value = _mark(option, values[0] if values else "")
            values = (value,)
        elif name in ("comment",):
            values = tuple(values)
        out[option] = values
    if name == "recent":
        out.setdefault("--mask", (_FULL_MASK[family],))
        if "--rdest" not in out:
            out.setdefault("--rsource", ())
    if name == "REJECT":
        out.setdefault(
            "--reject-with", ("icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable",)
        )
    return (name, tuple(sorted(out.items())))


def canonical_rule(line: str, family: Family) -> Canonical:
    """`-A CHAIN ...` as a comparable value (the chain name excluded)."""
    tokens = _tokens(line)
    if len(tokens) < 2 or tokens[0] != "-A":
        raise ValueError(f"not a rule: {line!r}")
    basic: dict[str, tuple[bool, str]] = {}
    blocks: list[Canonical] = []
    name = ""
    opts: list[tuple[str, tuple[str, ...]]] = []
    target: Canonical = ()
    in_target = False
    negate = False
    i = 2

    def flush() -> None:
        nonlocal name, opts
        if name and not in_target:
            blocks.append(_block(name, opts, family))
        name, opts = "", []

    while i < len(tokens):
        tok = tokens[i]
        if tok == "!":
            negate = True
            i += 1
            continue
        if tok in _BASIC and i + 1 < len(tokens):
            value = tokens[i + 1]
            key = _BASIC_NAME.get(tok, tok)
            basic[key] = (negate, _host(value, family) if key in ("-s", "-d") else value.lower())
            negate = False
            i += 2
            continue
        if tok in ("-m", "--match"):
            flush()
            name = tokens[i + 1]
            i += 2
            continue
        if tok in ("-j", "--jump", "-g", "--goto"):
            flush()
            in_target = True
            name = ("goto:" if tok in ("-g", "--goto") else "") + tokens[i + 1]
            i += 2
            continue
        if tok.startswith("-"):
            values: list[str] = []
            j = i + 1
            while j < len(tokens) and not tokens[j].startswith("-") and tokens[j] != "!":
                values.append(tokens[j])
                j += 1
            option = ("!" if negate else "") + tok
            if option in ("-d", "-s"):
                values = [_host(v, family) for v in values]
            opts.append((option, tuple(values)))
            negate = False
            i = j
            continue
        i += 1
    if in_target:
        target = _block(name, opts, family)
    else:
        flush()
    return (tuple(sorted(basic.items())), tuple(blocks), target)


def chains_in_save(text: str) -> dict[str, list[str]]:
    """Every chain of one table in `iptables-save` output, with its rule lines."""
    chains: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            chain = line.split(" ", 2)[1]
            chains.setdefault(chain, []).append(line)
    return chains


def same_rules(have: Iterable[str], want: Iterable[str], family: Family) -> bool:
    have, want = list(have), list(want)
    if len(have) != len(want):
        return False
    try:
        return all(
            canonical_rule(a, family) == canonical_rule(b, family) for a, b in zip(have, want, strict=True)
        )
    except ValueError:
        return False
