"""Registration methods: one file per method, each registering a :class:`bench.Method` subclass.

Installed as ``bench.methods`` (never as a bare top-level ``methods``). Every module here that does not
start with ``_`` is imported by the registry on first use.
"""
