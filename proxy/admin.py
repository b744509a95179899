"""Admin API: create, read, list and delete sandbox records over HTTP, on a listener of its own.

Served only when `[admin] listen` is set. Every route but `GET /openapi.json` needs
`Authorization: Bearer <token>` (`[admin] token` or the SANDBOX_PROXY_ADMIN_TOKEN environment
variable); without it the answer is 401. The routes and bodies are described in
proxy/admin_openapi.json, served at `GET /openapi.json`:

- `PUT /sandboxes/{id}`: body is the record JSON every kind validates (`record_from_mapping`);
  a problem is a 400 naming the field. Answers the stored record.
- `GET /sandboxes/{id}`: the record (a token only as its sha256), or 404; 409 when the store
  holds something under the id that is not a valid record (the edge answers it as not found).
- `GET /sandboxes?limit=100&after=<id>`: a page in id order and `next` (the `after` of the next
  page, null on the last).
- `DELETE /sandboxes/{id}`: 204, or 404. Connections to the sandbox are closed at once.
- `POST /sandboxes/{id}/shares`: body `{"port": 3000, "ttl": 3600}` (optional `scheme`,
  `domain`); answers 201 with the share link (`url`, `token`, `expires`, `epoch`), see
  proxy/share.py. 409 while `[access] share_key` is not set.

Writes go to the registry's own store (memory for static, Redis for redis); a read-only kind
answers 405. A store that cannot be reached answers 503 `registry unavailable`. Every error is the
document's `Error` object (`{"error": "..."}`), aiohttp's own 404 and 405 for paths and methods
that do not exist included.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from proxy import share
from proxy.config import ProxyConfig
from proxy.registry import Registry
from proxy.registry.record import RECORD_KEYS, SandboxRecord, record_from_mapping

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler

log = logging.getLogger("sandbox_proxy.admin")

OPENAPI_PATH = Path(__file__).with_name("admin_openapi.json")
MAX_BODY = 64 * 1024
DEFAULT_PAGE = 100
MAX_PAGE = 1000
# A protocol and a union are not classes to pass as AppKey's second argument: subscript instead.
REGISTRY_KEY = web.AppKey[Registry]("registry")
TOKEN_KEY = web.AppKey("token", bytes)
CONFIG_KEY = web.AppKey[ProxyConfig | None]("config")  # None: share links off


def problem(status: int, message: str, field: str | None = None, **extra: Any) -> web.Response:
    body = {"error": message, **({"field": field} if field else {}), **extra}
    return web.json_response(body, status=status)


def record_view(record: SandboxRecord) -> dict[str, Any]:
    return {"id": record.sandbox_id, **record.to_mapping()}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own error answers (no such path: 404, no such method: 405 with Allow) in the
    documented Error shape instead of plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        if exc.status == 404:
            message = f"no such path: {request.path}"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        else:
            message = (exc.reason or "error").lower()
        response = problem(exc.status, message)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == "/openapi.json" and request.method in ("GET", "HEAD"):
        return await handler(request)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), request.app[TOKEN_KEY]):
        response = problem(401, "a valid bearer token is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="sandbox-proxy admin"'
        return response
    return await handler(request)


@web.middleware
async def store_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except NotImplementedError as exc:
        response = problem(405, str(exc) or "not supported by this registry kind")
        response.headers["Allow"] = "GET" if request.match_info.get("id") else ""
        return response
    except Exception as exc:
        log.warning("admin %s %s: registry unavailable: %s", request.method, request.path, exc)
        return problem(503, "registry unavailable")


def _registry(request: web.Request) -> Registry:
    return request.app[REGISTRY_KEY]


def _sandbox_id(request: web.Request) -> str:
    sandbox_id = request.match_info["id"]
    try:
        record_from_mapping(sandbox_id, {"host": "x"})
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": str(exc), "field": "id"}),
                                 content_type="application/json") from None
    return sandbox_id


async def put_sandbox(request: web.Request) -> web.Response:
    registry = _registry(request)
    sandbox_id = _sandbox_id(request)
    if not registry.writable:
        return _read_only(registry)
    try:
        body = await request.json(loads=json.loads)
    except web.HTTPRequestEntityTooLarge:
        return problem(413, f"the body must be at most {MAX_BODY} bytes", "body")
    except ValueError as exc:
        return problem(400, f"the body must be JSON: {exc}", "body")
    try:
        record = record_from_mapping(sandbox_id, body)
    except ValueError as exc:
        message = str(exc)
        field, colon, rest = message.partition(":")
        known = field in RECORD_KEYS or rest.strip() == "unknown key"
        return problem(400, message, field if colon and known else "body")
    await registry.put(record)
    log.info("admin: put %s -> %s", sandbox_id, record.host)
    return web.json_response(record_view(record))


async def get_sandbox(request: web.Request) -> web.Response:
    sandbox_id = _sandbox_id(request)
    try:
        record = await _registry(request).get(sandbox_id)
    except ValueError as exc:  # the store holds something unusable under this id
        return problem(409, str(exc), id=sandbox_id)
    if record is None:
        return problem(404, "sandbox not found", id=sandbox_id)
    return web.json_response(record_view(record))


async def delete_sandbox(request: web.Request) -> web.Response:
    registry = _registry(request)
    sandbox_id = _sandbox_id(request)
    if not registry.writable:
        return _read_only(registry)
    if not await registry.delete(sandbox_id):
        return problem(404, "sandbox not found", id=sandbox_id)
    log.info("admin: deleted %s", sandbox_id)
    return web.Response(status=204)


async def list_sandboxes(request: web.Request) -> web.Response:
    text = request.query.get("limit", str(DEFAULT_PAGE))
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        return problem(400, f"limit must be an integer from 1 to {MAX_PAGE}", "limit")
    after = request.query.get("after") or None
    records, next_after = await _registry(request).list(after, int(text))
    return web.json_response({"sandboxes": [record_view(r) for r in records],
                              "next": next_after})


async def openapi(_: web.Request) -> web.Response:
    return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/json")


def _read_only(registry: Registry) -> web.Response:
    response = problem(405, f"the {registry.kind} registry is read-only")
    response.headers["Allow"] = "GET"
    return response


async def create_share(request: web.Request) -> web.Response:
    sandbox_id = _sandbox_id(request)
    config = request.app[CONFIG_KEY]
    if config is None or not config.access.share_key:
        return problem(409, "share links are off: set [access] share_key")
    key = config.access.share_key
    try:
        body = await request.json(loads=json.loads)
    except ValueError as exc:
        return problem(400, f"the body must be JSON: {exc}", "body")
    if not isinstance(body, dict):
        return problem(400, "the body must be a JSON object", "body")
    unknown = sorted(set(body) - {"port", "ttl", "scheme", "domain"})
    if unknown:
        return problem(400, f"{unknown[0]}: unknown key", unknown[0])
    scheme = body.get("scheme", "https")
    found = share.check_request(body.get("port"), body.get("ttl"), scheme)
    if found is not None:
        return problem(400, found, found.partition(":")[0])
    domain = body.get("domain", sorted(config.server.domains)[0])
    if not isinstance(domain, str) or domain not in config.server.domains:
        return problem(400, "domain: not one of [server] domains", "domain")
    record = await _registry(request).get(sandbox_id)
    if record is None:
        return problem(404, "sandbox not found", id=sandbox_id)
    expires = int(time.time()) + body["ttl"]
    token = share.mint(key.encode(), sandbox_id, body["port"], expires, record.share_epoch)
    log.info("admin: share link for %s port %d until %d", sandbox_id, body["port"], expires)
    return web.json_response({"url": share.share_url(scheme, domain, sandbox_id, body["port"],
                                                     token),
                              "token": token, "expires": expires, "port": body["port"],
                              "epoch": record.share_epoch}, status=201)


def admin_app(registry: Registry, token: str,
              config: ProxyConfig | None = None) -> web.Application:
    app = web.Application(middlewares=[json_errors, require_token, store_errors],
                          client_max_size=MAX_BODY)
    app[REGISTRY_KEY] = registry
    app[TOKEN_KEY] = token.encode()
    app[CONFIG_KEY] = config
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/sandboxes", list_sandboxes)
    app.router.add_put("/sandboxes/{id}", put_sandbox)
    app.router.add_get("/sandboxes/{id}", get_sandbox)
    app.router.add_delete("/sandboxes/{id}", delete_sandbox)
    app.router.add_post("/sandboxes/{id}/shares", create_share)
    return app


async def start_admin(config: ProxyConfig, registry: Registry) -> web.AppRunner | None:
    """Start the admin listener when `[admin] listen` is set; the caller cleans the runner up."""
    admin = config.admin
    if admin.listen is None or admin.token is None:
        return None
    runner = web.AppRunner(admin_app(registry, admin.token, config), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, admin.listen.host, admin.listen.port).start()
    log.info("admin API on %s (%s registry%s)", admin.listen, registry.kind,
             "" if registry.writable else ", read-only")
    return runner
