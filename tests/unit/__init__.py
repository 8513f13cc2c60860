"""Tests with no privileges: pure code, fakes, loopback sockets."""
