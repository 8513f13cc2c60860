"""`kproxy dry-run` prints what `kproxy run` writes for the same objects, also past kube-proxy's
large-cluster threshold (more than 1000 endpoints: no comments on endpoint rules).

Found by tests/e2e/test_faults.py, whose kernel-equals-dry-run check failed for 2000 services: the
agent sized its render config by the endpoint total and dry-run did not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kproxy.cli import main
from kproxy.config import LARGE_CLUSTER_ENDPOINTS


def manifest(path: Path, endpoints: int) -> Path:
    """One Service with `endpoints` endpoints in one slice."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "big", "namespace": "demo"},
        "spec": {
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "p", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    }
    eps = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "big-1", "namespace": "demo", "labels": {"kubernetes.io/service-name": "big"}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [f"10.244.{i // 250}.{i % 250 + 1}"], "conditions": {"ready": True}}
            for i in range(endpoints)
        ],
    }
    path.write_text(f"---\n{json.dumps(svc)}\n---\n{json.dumps(eps)}\n")
    return path


@pytest.mark.parametrize(
    ("endpoints", "commented"), [(LARGE_CLUSTER_ENDPOINTS, True), (LARGE_CLUSTER_ENDPOINTS + 1, False)]
)
def test_endpoint_comments_follow_large_cluster_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], endpoints: int, commented: bool
) -> None:
    path = manifest(tmp_path / "big.yaml", endpoints)
    assert main(["dry-run", "-f", str(path), "--node-name", "node-a"]) == 0
    out = capsys.readouterr().out
    sep_rules = [line for line in out.splitlines() if line.startswith("-A KUBE-SEP-")]
    assert len(sep_rules) == 2 * endpoints, "premise: a masquerade and a DNAT rule per endpoint"
    with_comment = [line for line in sep_rules if "--comment" in line]
    assert len(with_comment) == (len(sep_rules) if commented else 0), with_comment[:2]
    assert '--comment "demo/big:p cluster IP"' in out, "service rules keep their comments either way"
