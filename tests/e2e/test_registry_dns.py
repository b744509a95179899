"""The dns registry against a real dnsmasq: TTL caching, negative caching from the SOA, TXT
settings, coalescing, removal at expiry, outages, and the proxy process on top of it."""

from __future__ import annotations

import asyncio
import json
import time

import dns.asyncresolver
import dns.nameserver
import dns.resolver
import pytest

from proxy.config import ConfigError, ListenAddress, RegistryConfig, load_config
from proxy.registry.dns import DnsRegistry
from proxy.registry.record import SandboxRecord
from support.fleet import (DnsServer, check_core_scenarios, closed_within, core_records,
                           dns_server, ws_connect)  # noqa: F401 - dns_server is a fixture
from support.process import wait_until
from support.raw_http import fetch, not_found_body

pytestmark = pytest.mark.timeout(90)

TTL = 1  # seconds, for answers and negative answers (dnsmasq --auth-ttl/--local-ttl)


async def started(server: DnsServer, **extra) -> DnsRegistry:
    settings = dict(kind="dns", nameservers=(ListenAddress("127.0.0.1", server.port),),
                    timeout=1.0)
    registry = DnsRegistry(RegistryConfig(**{**settings, **extra}))
    await registry.start()
    return registry


async def _true(value: bool) -> bool:
    return value


def txt_for(record: dict) -> list[str]:
    """The TXT strings carrying what a core record says beyond its address."""
    strings = []
    if "ports" in record:
        strings.append("ports=" + " ".join(f"{k}:{v}" for k, v in record["ports"].items()))
    if "mask_request_host" in record:
        strings.append("mask=" + record["mask_request_host"])
    if "mask_origin" in record:
        strings.append(f"mask-origin={str(record['mask_origin']).lower()}")
    if "traffic_access_token_sha256" in record:
        strings.append("token-sha256=" + record["traffic_access_token_sha256"])
    if "state" in record:
        strings.append("state=" + record["state"])
    if "allowed_clients" in record:
        strings.append("allowed-clients=" + ",".join(record["allowed_clients"]))
    if "public_ports" in record:
        strings.append("public-ports=" + ",".join(map(str, record["public_ports"])))
    for port, paths in record.get("blocked_paths", {}).items():
        strings.append(f"blocked-paths:{port}=" + ",".join(paths))
    if "share_epoch" in record:
        strings.append(f"share-epoch={record['share_epoch']}")
    return strings


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, problem", [
    ("zone", "not a zone", "is not a domain name"),
    ("zone", "", "is not a domain name"),
    ("nameservers", [], "must list at least one server"),
    ("nameservers", ["dns.example.com"], "is not an IP address or IP:port"),
    ("nameservers", ["127.0.0.1:99999"], "is not an IP address or IP:port"),
    ("nameservers", "127.0.0.1", "expected a list"),
    ("negative_ttl", -1, "must be >= 0"),
])
def test_bad_dns_keys_name_file_key_and_problem(tmp_path, key, value, problem):
    config = tmp_path / "proxy.toml"
    config.write_text(f"[registry]\nkind = \"dns\"\n{key} = {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert str(config) in message and f"[registry] {key}:" in message and problem in message


def test_nameservers_default_to_port_53(tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text('[registry]\nkind = "dns"\nnameservers = ["10.0.0.2", "127.0.0.1:5353", '
                      '"[::1]:5300"]\nzone = "Sandboxes.Internal."\n')
    settings = load_config(config).registry
    assert settings.nameservers == (ListenAddress("10.0.0.2", 53),
                                    ListenAddress("127.0.0.1", 5353), ListenAddress("::1", 5300))
    assert settings.zone == "sandboxes.internal"


# -- the registry in-process -----------------------------------------------------------------


async def test_answer_is_cached_for_its_ttl_with_txt_settings(dns_server):
    token_hash = "ab" * 32
    dns_server.start(hosts={"abc": "127.0.0.5"},
                     txt={"abc": ["mask=localhost:${PORT}", "ports=3000:4000 8080:9000",
                                  f"token-sha256={token_hash}", "mask-origin=false"]})
    registry = await started(dns_server)
    try:
        pending = registry.lookup("abc")
        assert type(pending) is not SandboxRecord
        record = await pending
        assert record.host == "127.0.0.5"
        assert record.backend_port(3000) == 4000 and record.backend_port(8080) == 9000
        assert record.masked_host(3000) == b"localhost:3000"
        assert record.token_sha256 == bytes.fromhex(token_hash)
        assert record.mask_origin is False
        assert registry.lookup("abc") is record  # warm: the record itself
    finally:
        await registry.close()


async def test_nxdomain_is_cached_for_the_soa_negative_ttl_capped(dns_server):
    dns_server.start(hosts={})
    registry = await started(dns_server, negative_ttl=0.3)
    try:
        assert await registry.lookup("nobody") is None
        assert registry.lookup("nobody") is None  # cached: no awaitable
        await asyncio.sleep(0.4)  # the cap (0.3 s) is shorter than the SOA's 1 s
        assert registry.lookup("nobody") is not None  # expired: asks again
    finally:
        await registry.close()


async def test_concurrent_lookups_share_one_query_per_type(dns_server):
    dns_server.start(hosts={"abc": "127.0.0.5"})
    registry = await started(dns_server)
    queries = []
    real_query = registry._query

    async def counting_query(qname, rdtype):
        queries.append(rdtype)
        return await real_query(qname, rdtype)

    registry._query = counting_query
    try:
        answers = await asyncio.gather(*(registry.lookup("abc") for _ in range(30)))
        assert {a.host for a in answers} == {"127.0.0.5"}
        assert sorted(queries) == ["A", "AAAA", "TXT"]
        assert registry.lookup_outcomes["coalesced"] == 29
    finally:
        await registry.close()


async def test_unknown_txt_key_fails_closed(dns_server):
    dns_server.start(hosts={"typo": "127.0.0.5"}, txt={"typo": ["token-sha265=00"]})
    registry = await started(dns_server)
    try:
        assert await registry.lookup("typo") is None
        assert registry.lookup_outcomes["invalid"] == 1
    finally:
        await registry.close()


@pytest.fixture
def plain_dns_server(tmp_path):
    """dnsmasq answering by --address=/name/ip, not authoritative: such a name has its A record
    while its TXT and AAAA are NXDOMAIN."""
    server = DnsServer(tmp_path / "plain-dns", authoritative=False)
    yield server
    server.kill()


async def test_address_answer_decides_existence_when_txt_is_nxdomain(plain_dns_server):
    plain_dns_server.start(addresses={"abc": "127.0.0.5"})
    # what the server answers: the A record, and NXDOMAIN for TXT of the same name
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", plain_dns_server.port)]
    assert (await resolver.resolve("abc.sandboxes.internal", "A"))[0].address == "127.0.0.5"
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("abc.sandboxes.internal", "TXT")
    registry = await started(plain_dns_server)
    try:
        record = await registry.lookup("abc")
        assert record is not None and record.host == "127.0.0.5"
        assert record.backend_port(3000) == 3000 and record.mask_request_host is None
        assert registry.lookup_outcomes["found"] == 1
        assert await registry.lookup("nobody") is None  # NXDOMAIN for A as well: not found
    finally:
        await registry.close()


async def test_record_gone_or_moved_at_ttl_is_a_removal(dns_server):
    dns_server.start(hosts={"abc": "127.0.0.5", "other": "127.0.0.6"})
    registry = await started(dns_server)
    removed: list[str] = []
    registry.add_removal_listener(removed.extend)
    try:
        await registry.lookup("abc")
        await registry.lookup("other")
        dns_server.write_hosts({"abc": "127.0.0.7", "other": "127.0.0.6"})
        await wait_until(lambda: _true(removed == ["abc"]), TTL + 2)
        assert registry.lookup("abc").host == "127.0.0.7"
        dns_server.write_hosts({"other": "127.0.0.6"})
        await wait_until(lambda: _true(removed == ["abc", "abc"]), TTL + 2)
        assert "other" not in removed  # unchanged answers are no removal
    finally:
        await registry.close()


async def test_unreachable_nameserver_raises_within_the_timeout_and_recovers(dns_server):
    dns_server.start(hosts={"abc": "127.0.0.5"})
    registry = await started(dns_server)
    try:
        await registry.lookup("abc")
        dns_server.kill()
        start = time.monotonic()
        with pytest.raises(Exception):
            await registry.lookup("unknown")
        assert time.monotonic() - start < 1.5
        assert not registry.ready()
        # the cached entry expires and cannot be refreshed: it is not served any more
        await wait_until(lambda: _true(type(registry.lookup("abc")) is not SandboxRecord),
                         TTL + 3)
        dns_server.start()
        await wait_until(lambda: _true(registry.ready()), 5)
        found = registry.lookup("abc")
        record = found if type(found) is SandboxRecord else await found
        assert record.host == "127.0.0.5"
    finally:
        await registry.close()


# -- the proxy process -------------------------------------------------------------------------


def dns_config(server: DnsServer) -> dict:
    return {"registry": {"kind": "dns", "nameservers": [server.nameserver],
                         "zone": "sandboxes.internal", "timeout": 1.0}}


async def test_core_scenarios_with_dns(proxy, backend, refused_port, dns_server):
    records = core_records(backend.port, refused_port)
    dns_server.start(hosts={sid: r["host"] for sid, r in records.items()},
                     txt={sid: txt_for(r) for sid, r in records.items()})
    p = proxy(sandboxes={}, config=dns_config(dns_server))
    await check_core_scenarios(p)


async def test_record_removed_from_dns_closes_websocket(proxy, backend, dns_server):
    ports = [f"ports=3000:{backend.port}"]
    dns_server.start(hosts={"demo": "127.0.0.1", "doomed": "127.0.0.1"},
                     txt={"demo": ports, "doomed": ports})
    p = proxy(sandboxes={}, config=dns_config(dns_server))
    async with ws_connect(p, "demo") as keep, ws_connect(p, "doomed") as doomed:
        await doomed.send("alive?")
        assert await asyncio.wait_for(doomed.recv(), 5) == "alive?"
        dns_server.write_hosts({"demo": "127.0.0.1"})
        await closed_within(doomed, TTL + 2)
        r = await fetch(p, "/echo", host="3000-doomed.localhost")
        assert r.status == 502 and r.json() == not_found_body("doomed")
        await keep.send("still here")
        assert await asyncio.wait_for(keep.recv(), 5) == "still here"


async def test_sandbox_published_by_address_only_is_served(proxy, backend, plain_dns_server):
    """A name dnsmasq answers with --address (A, and NXDOMAIN for TXT) is a sandbox without
    settings: served on the same port, not answered 502 "not found"."""
    plain_dns_server.start(addresses={"demo": "127.0.0.1"})
    p = proxy(sandboxes={}, config=dns_config(plain_dns_server))
    r = await fetch(p, "/echo", host=f"{backend.port}-demo.localhost")
    assert r.status == 200, r.body
    r = await fetch(p, "/echo", host=f"{backend.port}-nobody.localhost")
    assert r.status == 502 and r.json() == not_found_body("nobody")


async def test_dns_down_is_503_never_a_hang(proxy, backend, dns_server):
    dns_server.start(hosts={})
    p = proxy(sandboxes={}, config=dns_config(dns_server))
    dns_server.kill()
    start = time.monotonic()
    r = await fetch(p, "/echo", host="3000-demo.localhost", timeout=10)
    assert time.monotonic() - start < 2.0
    assert r.status == 503 and r.json()["message"] == "registry unavailable"
    dns_server.start(hosts={"demo": "127.0.0.1"}, txt={"demo": [f"ports=3000:{backend.port}"]})

    async def served():
        return (await fetch(p, "/echo", host="3000-demo.localhost")).status == 200

    await wait_until(served, 5)
