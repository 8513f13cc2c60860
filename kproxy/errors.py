"""Every error kproxy raises on purpose.

KproxyError
├── ObjectError        a Kubernetes object that cannot be used (skipped, never fatal)
├── ConfigError        a flag or config-file value refused at start
├── StartupError       something `run` needs is missing: exit 1 with one line, before serving
├── RestoreError       iptables-restore refused a payload (the next sync is full)
├── SourceError        a source (API server, manifest directory) failed
├── CleanupError       `kproxy cleanup` could not read or remove some of what it owns (exit non-zero)
└── NftablesError      an nftables transaction was refused (the next sync is full)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kproxy.state.model import ObjectRef


class KproxyError(Exception):
    """Root of kproxy's own errors; anything else escaping is a bug."""


class ObjectError(KproxyError):
    """One object is unusable. Carries where it came from, which object and which field."""

    def __init__(self, ref: ObjectRef, field: str, reason: str, source: str = "") -> None:
        self.ref = ref
        self.field = field
        self.reason = reason
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        field = f"{self.field}: " if self.field else ""
        return f"{where}{self.ref}: {field}{self.reason}"


class ConfigError(KproxyError):
    def __init__(self, option: str, reason: str) -> None:
        self.option = option
        self.reason = reason
        super().__init__(f"{option}: {reason}")


class StartupError(KproxyError):
    """What is missing and how to fix it, printed as one line before `kproxy run` exits 1."""

    def __init__(self, thing: str, fix: str) -> None:
        self.thing = thing
        self.fix = fix
        super().__init__(f"{thing}: {fix}")


class RestoreError(KproxyError):
    def __init__(self, family: int, returncode: int, stderr: str, line: int | None = None) -> None:
        self.family = family
        self.returncode = returncode
        self.stderr = stderr
        self.line = line
        at = f" at line {line}" if line is not None else ""
        super().__init__(
            f"ip{'6' if family == 6 else ''}tables-restore failed{at} (exit {returncode}): {stderr.strip()}"
        )


class SourceError(KproxyError):
    pass


class CleanupError(KproxyError):
    """What `kproxy cleanup` could not do; everything else it did. One entry per failed step."""

    def __init__(self, failures: list[tuple[str, str]]) -> None:
        self.failures = failures
        """(what: e.g. "iptables-nft IPv6 nat", why: the tool's message)."""
        super().__init__("; ".join(f"{what}: {why}" for what, why in failures))


class NftablesError(KproxyError):
    """An nftables transaction was refused (nothing of it applied; the next sync is full)."""

    def __init__(self, family: int, returncode: int, stderr: str) -> None:
        self.family = family
        self.returncode = returncode
        self.stderr = stderr
        table = f"{'ip6' if family == 6 else 'ip'} kube-proxy" if family else "nftables"
        super().__init__(f"{table}: transaction failed (code {returncode}): {stderr.strip()[:2000]}")
