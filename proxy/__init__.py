"""sandbox-proxy: the edge proxy that gives every port of every sandbox its own public URL."""

__version__ = "0.1.0"
