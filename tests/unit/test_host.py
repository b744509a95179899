"""Host parsing: the table of behaviour.md cases, plus properties over generated hosts."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.host import InvalidHost, SandboxAddress, parse_sandbox_host

DOMAINS = frozenset({"localhost", "example.app", "e2b.dev"})


@pytest.mark.parametrize("host, expected", [
    ("3000-demo.localhost", (3000, "demo")),
    ("3000-demo.localhost:8080", (3000, "demo")),
    ("3000-DEMO.LocalHost", (3000, "demo")),
    ("3000-demo.localhost.", (3000, "demo")),
    ("3000-demo.localhost.:443", (3000, "demo")),
    ("1-a.example.app", (1, "a")),
    ("65535-i62mff4ahtrdfdkyn2esc.example.app", (65535, "i62mff4ahtrdfdkyn2esc")),
    ("  8080-x1.example.app  ", (8080, "x1")),
    # the older form with a client id: everything after the second `-` is ignored
    ("3000-ip3nfrvajtqu5ktoxugc7-b0b684e9.e2b.dev", (3000, "ip3nfrvajtqu5ktoxugc7")),
    ("49983-isv6ril5xadwn1k9t2jye-6532622b.example.app", (49983, "isv6ril5xadwn1k9t2jye")),
    ("3000-demo-b0b684e9.localhost", (3000, "demo")),
    ("3000-demo-a-b.localhost", (3000, "demo")),
])
def test_valid_hosts(host, expected):
    assert parse_sandbox_host(host, DOMAINS) == SandboxAddress(*expected)


@pytest.mark.parametrize("host", [
    "", "localhost", "demo", "3000-demo", "3000demo.localhost", "-demo.localhost",
    "3000-.localhost", "0-demo.localhost", "65536-demo.localhost", "70000-demo.localhost",
    "+300-demo.localhost", "3 00-demo.localhost", "abc-demo.localhost", "3000-de_mo.localhost",
    "3000-de.mo.localhost", "3000--b0b684e9.localhost", "3000-d_mo-b0b684e9.localhost",
    "3000-démo.localhost", "3000-demo-b0b6é.localhost", "3000-demo.localhost\xa0",
    "3000-demo\u200b.localhost", "3000-demo.localhost\x85",
    "3000-demo.other.app", "3000-demo.localhost.evil", "3000-demo.sub.localhost",
    "3000-demo.localhost:", "3000-demo.localhost:80a", "[::1]:8080", "[::1",
    "3000-demo.localhost..", "٣٠٠٠-demo.localhost", "3000-demo.localhost:８０",
])
def test_bad_hosts(host):
    with pytest.raises(InvalidHost):
        parse_sandbox_host(host, DOMAINS)


ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=30)
ports = st.integers(min_value=1, max_value=65535)


@given(port=ports, sandbox_id=ids, upper=st.booleans(), dot=st.booleans(),
       host_port=st.one_of(st.none(), st.integers(0, 65535)))
def test_round_trip(port, sandbox_id, upper, dot, host_port):
    host = f"{port}-{sandbox_id}.example.app" + ("." if dot else "")
    if host_port is not None:
        host += f":{host_port}"
    if upper:
        host = host.upper()
    assert parse_sandbox_host(host, DOMAINS) == (port, sandbox_id)


@given(st.text(max_size=60))
def test_never_crashes_and_only_accepts_canonical_ids(host):
    try:
        port, sandbox_id = parse_sandbox_host(host, DOMAINS)
    except InvalidHost:
        return
    assert 0 < port < 65536
    assert sandbox_id.isascii() and sandbox_id.isalnum() and sandbox_id == sandbox_id.lower()
