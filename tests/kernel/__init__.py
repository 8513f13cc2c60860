"""Tests that load rules or read conntrack in network namespaces they create (root; see conftest)."""
