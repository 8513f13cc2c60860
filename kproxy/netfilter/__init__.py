"""Netfilter plumbing every proxy mode shares: ruleset text, iptables-restore, the canary check,
cleanup and conntrack. Below the modes: nothing here imports a backend."""
