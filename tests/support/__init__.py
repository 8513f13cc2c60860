"""Helpers shared by tests: fakes, stand-ins and oracles that production code never calls."""
