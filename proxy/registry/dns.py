"""DNS registry: `<sandboxId>.<zone>` A/AAAA records name a sandbox's backend, so Consul, CoreDNS
or Kubernetes DNS can be the registry.

A look-up asks the configured nameservers for A, AAAA and TXT of the name at once (dnspython's
asyncio resolver; no search list, no system resolver). The first A address is the backend (else
the first AAAA); the address records alone say whether the sandbox exists, so an NXDOMAIN for
the TXT (or AAAA) query beside an A answer, as dnsmasq's `--address` gives, means no settings.
An optional TXT record on the same name carries per-sandbox settings as `key=value` strings,
validated like every other record (proxy/registry/record.py):

    mask=localhost:${PORT}      -> mask_request_host
    token-sha256=<64 hex>       -> traffic_access_token_sha256
    ports=3000:32768,8080:9000  -> ports (sandbox port : backend port)
    state=paused                -> state (running, paused, pausing or resuming)
    auto-resume=true            -> auto_resume
    allowed-clients=10.0.0.0/8,192.0.2.7   -> allowed_clients (every port)
    allowed-clients:3000=203.0.113.0/24    -> allowed_clients for port 3000
    public-ports=3000,8080                 -> public_ports
    blocked-paths:49983=/init,/upgrade     -> blocked_paths for port 49983
    share-epoch=2                          -> share_epoch
    mask-origin=false           -> mask_origin (default: [upstream] mask_origin)

An unknown key makes the record invalid and the sandbox is answered as not found (fail closed:
a misspelt `token-sha256` must not publish a sandbox without its token).

Caching: a positive answer is kept for the smallest TTL of its record sets; NXDOMAIN (or a name
without addresses) for the negative TTL of the SOA in the answer (min of the SOA's TTL and its
minimum field, RFC 2308), capped by `[registry] negative_ttl`, and not at all without a SOA.
When a positive entry expires a sweeper asks again while the old answer keeps serving; NXDOMAIN
or another address then is a removal (open connections are closed). A failed refresh drops the
entry: requests then ask DNS themselves and get 503 while it cannot answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.rrset

from proxy.config import RegistryConfig
from proxy.registry.record import SandboxRecord, record_from_mapping
from proxy.registry.remote import InvalidRecord, RegistryUnreachable, RemoteRegistry

log = logging.getLogger("sandbox_proxy.registry")

SWEEP_EVERY = 0.5        # seconds between checks for expired entries
REFRESHES_PER_SWEEP = 256
TXT_KEYS = {"mask": "mask_request_host", "token-sha256": "traffic_access_token_sha256",
            "ports": "ports", "state": "state", "auto-resume": "auto_resume",
            "mask-origin": "mask_origin"}
# What one query gives: the answer (perhaps without data), or the NXDOMAIN it raised.
Answer = dns.resolver.Answer | dns.resolver.NXDOMAIN


class DnsRegistry(RemoteRegistry):
    """Sandboxes as DNS names under one zone; read-only."""

    kind = "dns"
    writable = False

    def __init__(self, config: RegistryConfig):
        super().__init__(config.timeout)
        self.zone = dns.name.from_text(config.zone)
        self.nameservers = config.nameservers
        self.negative_ttl = config.negative_ttl
        self._caching = True  # TTLs bound staleness; nothing else to wait for
        self._healthy = True
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._sweeper: asyncio.Task | None = None

    def ready(self) -> bool:
        return self._healthy

    async def start(self) -> None:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(a.host, a.port)
                                for a in self.nameservers]
        resolver.lifetime = self.timeout
        resolver.timeout = min(self.timeout, 1.0)  # per server try; retried within lifetime
        resolver.cache = None
        self._resolver = resolver
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        tasks = [t for t in (self._sweeper, *self._inflight.values()) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None

    def _fetch_failed(self, sandbox_id: str) -> None:
        super()._fetch_failed(sandbox_id)
        if self._healthy:
            log.warning("dns registry: nameservers %s not answering; 503 until they do",
                        ", ".join(map(str, self.nameservers)))
        self._healthy = False

    def _fetch_succeeded(self) -> None:
        self._healthy = True

    # -- one look-up -------------------------------------------------------------------------

    def _started(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            raise RegistryUnreachable("dns registry not started yet")
        return self._resolver

    async def _fetch(self, sandbox_id: str) -> tuple[SandboxRecord | None, float | None]:
        self._started()  # RegistryUnreachable before start()
        if len(sandbox_id) > 63:
            return None, 0.0  # cannot be a DNS label, so no such name
        qname = dns.name.Name((sandbox_id.encode("ascii"),)).concatenate(self.zone)
        answers = await asyncio.gather(*(self._query(qname, t) for t in ("A", "AAAA", "TXT")),
                                       return_exceptions=True)
        found: list[Answer] = []
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, dns.resolver.NXDOMAIN):
                raise RegistryUnreachable(f"dns registry: {type(answer).__name__}: {answer}")
            found.append(answer)
        # The address records alone decide whether the sandbox exists: a server may answer a
        # name's A record and NXDOMAIN for its other types (dnsmasq's --address does), which
        # then only means "no TXT settings".
        a, aaaa, txt = found
        address = next((rdata.address for answer in (a, aaaa)
                        if (rrset := _rrset(answer)) is not None for rdata in rrset), None)
        if address is None:
            return None, self._negative_ttl(_responses(a, aaaa))
        ttls: list[float] = [rrset.ttl for answer in (a, aaaa, txt)
                             if (rrset := _rrset(answer)) is not None]
        txt_rrset = _rrset(txt)
        if txt_rrset is None and (negative := self._negative_ttl(_responses(txt))) > 0:
            ttls.append(negative)  # a TXT added later is seen within its negative TTL
        ttl = float(min(ttls))
        settings = txt_settings(txt_rrset) if txt_rrset is not None else {}
        try:
            return record_from_mapping(sandbox_id, {"host": address, **settings}), ttl
        except ValueError as exc:
            raise InvalidRecord(str(exc), ttl) from None

    async def _query(self, qname: dns.name.Name, rdtype: str) -> dns.resolver.Answer:
        return await self._started().resolve(qname, rdtype, search=False,
                                             raise_on_no_answer=False)

    def _negative_ttl(self, responses: list[dns.message.Message]) -> float:
        """RFC 2308: min(SOA TTL, SOA minimum) from the authority section, capped; 0 (do not
        cache) when the answer carries no SOA."""
        for response in responses:
            for rrset in getattr(response, "authority", ()):
                if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                    return float(min(rrset.ttl, rrset[0].minimum, self.negative_ttl))
        return 0.0

    # -- expiry ------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = loop.time()
            for sandbox_id in [s for s, until in self._absent.items() if until <= now]:
                del self._absent[sandbox_id]
            due = [s for s, until in self._expires.items()
                   if until <= now and s not in self._inflight][:REFRESHES_PER_SWEEP]
            for sandbox_id in due:
                self._fetch_shared(sandbox_id)  # the old record serves until this answers
            if not self._healthy and not self._inflight:
                await self._probe()

    async def _probe(self) -> None:
        """While unhealthy: any answer from the nameservers (even NXDOMAIN) makes us ready."""
        try:
            await self._started().resolve(self.zone, "SOA", search=False,
                                          raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            pass
        except (dns.exception.DNSException, OSError):
            return
        self._fetch_succeeded()


def _rrset(answer: Answer) -> dns.rrset.RRset | None:
    """The record set of an answer; None for no data and for NXDOMAIN."""
    return None if isinstance(answer, dns.resolver.NXDOMAIN) else answer.rrset


def _responses(*answers: Answer) -> list[dns.message.Message]:
    """The DNS messages behind answers and NXDOMAINs (for their SOA)."""
    out = []
    for answer in answers:
        if isinstance(answer, dns.resolver.NXDOMAIN):
            out.extend(answer.responses().values())
        else:
            out.append(answer.response)
    return out


def txt_settings(rrset: dns.rrset.RRset) -> dict[str, Any]:
    """The record keys carried by TXT strings `key=value`; ValueError-free (validation later)."""
    settings: dict[str, Any] = {}
    for rdata in rrset:
        for raw in rdata.strings:
            text = raw.decode("utf-8", "replace")
            key, sep, value = text.partition("=")
            key = key.strip().lower()
            if sep and (key == "allowed-clients" or key.startswith("allowed-clients:")):
                _add_ingress_rule(settings, key.partition(":")[2] or "*", value)
                continue
            if sep and key.startswith("blocked-paths:"):
                paths = settings.setdefault("blocked_paths", {})
                if isinstance(paths, dict):
                    paths.setdefault(key.partition(":")[2], []).extend(_items(value))
                continue
            if sep and key == "public-ports":
                settings["public_ports"] = [int(p) if p.isdigit() else p for p in _items(value)]
                continue
            if sep and key == "share-epoch":
                settings["share_epoch"] = int(value) if value.strip().isdigit() else value
                continue
            if not sep or key not in TXT_KEYS:
                # an unknown key reaches record_from_mapping, which rejects it by name
                settings[f"txt {text.strip()!r}"] = True
                continue
            name = TXT_KEYS[key.strip().lower()]
            value = value.strip()
            if name == "ports":
                settings[name] = _port_map(value)
            elif name in ("auto_resume", "mask_origin"):
                settings[name] = {"true": True, "false": False}.get(value.lower(), value)
            else:
                settings[name] = value
    return settings


def _items(value: str) -> list[str]:
    """A TXT list value: comma- or space-separated."""
    return [v for v in (v.strip() for v in value.replace(" ", ",").split(",")) if v]


def _add_ingress_rule(settings: dict[str, Any], port: str, value: str) -> None:
    """`allowed-clients=<cidr>,<cidr>` (every port) or `allowed-clients:<port>=...`."""
    rules = settings.setdefault("allowed_clients", {})
    if isinstance(rules, dict):
        rules.setdefault(port, []).extend(_items(value))


def _port_map(value: str) -> dict[str, int] | str:
    ports: dict[str, int] = {}
    for pair in filter(None, (p.strip() for p in value.replace(" ", ",").split(","))):
        sandbox_port, sep, backend_port = pair.partition(":")
        if not sep or not backend_port.isdigit():
            return value  # not a table: record_from_mapping names the key
        ports[sandbox_port] = int(backend_port)
    return ports
