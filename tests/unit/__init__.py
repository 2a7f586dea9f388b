"""Unit tests: plain modules, no sockets."""
