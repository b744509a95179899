"""Helpers for the sandbox-proxy tests (importable as ``support``: pytest puts tests/ on sys.path).

process.py owns the proxy subprocess and its config files; raw_http.py the HTTP clients and the
expected answers; backends.py, faulty_backends.py and recording_backend.py the backends put behind
the proxy; fleet.py the real registry servers (redis-server, dnsmasq, a control plane) and their
fixtures; chromium.py and app_servers.py the browser tests' Chromium and real web apps.
"""
