"""The JSON Schema of proxy.toml (proxy/config_schema.py, committed as config/proxy.schema.json):
current, valid, satisfied by every config the repository ships, and in agreement with the
parsers of proxy/config.py key by key."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from proxy.config import ConfigError, load_config
from proxy.config_schema import config_schema, render
from support.process import to_toml

ROOT = Path(__file__).resolve().parent.parent.parent
SCHEMA_FILE = ROOT / "config" / "proxy.schema.json"
# TOML, unlike JSON, tells 3 from 3.0, and so do the parsers: an integer key takes no float.
TomlValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    type_checker=jsonschema.Draft7Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool)))
VALIDATOR = TomlValidator(config_schema())


def schema_errors(data: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in VALIDATOR.iter_errors(data)]


def test_committed_schema_is_what_the_generator_produces(tmp_path):
    assert SCHEMA_FILE.read_text() == render(), "run `make config-schema`"
    jsonschema.Draft7Validator.check_schema(json.loads(SCHEMA_FILE.read_text()))
    # the command the Makefile runs, and its --check
    res = subprocess.run([sys.executable, "-m", "proxy.config_schema", "--check",
                          str(SCHEMA_FILE)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    stale = tmp_path / "stale.json"
    stale.write_text("{}\n")
    res = subprocess.run([sys.executable, "-m", "proxy.config_schema", "--check", str(stale)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "make config-schema" in res.stderr
    res = subprocess.run([sys.executable, "-m", "proxy.config_schema", "--output",
                          str(stale)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and stale.read_text() == render()


def shipped_configs() -> dict[str, str]:
    """Every proxy.toml the repository ships or documents."""
    configs = {"config/proxy.toml": (ROOT / "config" / "proxy.toml").read_text()}
    for path in sorted((ROOT / "config").rglob("*.toml")):
        if path.name == "proxy.toml" or "[server]" in path.read_text():
            configs[str(path.relative_to(ROOT))] = path.read_text()
    kubernetes = (ROOT / "config" / "kubernetes.yaml").read_text()
    block = kubernetes.split("proxy.toml: |\n", 1)[1].split("\n---", 1)[0]
    configs["config/kubernetes.yaml ConfigMap"] = "\n".join(
        line[4:] for line in block.splitlines())
    for doc in ("README.md", "docs/deployment.md", "docs/fleet.md"):
        for n, text in enumerate(re.findall(r"```toml\n(.*?)```", (ROOT / doc).read_text(),
                                            re.DOTALL)):
            if "[sandboxes." not in text:
                configs[f"{doc} toml block {n}"] = text
    return configs


@pytest.mark.parametrize("name", list(shipped_configs()))
def test_shipped_configs_validate_against_the_schema(name):
    data = tomllib.loads(shipped_configs()[name])
    assert not schema_errors(data), schema_errors(data)


def test_schema_names_every_section_and_key_of_the_shipped_config():
    data = tomllib.loads((ROOT / "config" / "proxy.toml").read_text())
    schema = config_schema()["properties"]
    assert set(data) == set(schema)
    for section, table in data.items():
        assert set(table) <= set(schema[section]["properties"]), section
    first_line = (ROOT / "config" / "proxy.toml").read_text().splitlines()[0]
    assert first_line == "#:schema ./proxy.schema.json"  # the editors' directive


# -- the schema and the parsers agree, key by key ----------------------------------------------

# Checks of proxy/config.py that JSON Schema cannot make (or that need the file system): there the
# schema accepts values the proxy refuses at start-up, never the other way round.
LOOSER = {
    "server.domains": "a name that normalizes to nothing ('.')",
    "server.trusted_proxies": "CIDR syntax",
    "upstream.allowed_networks": "CIDR syntax",
    "registry.nameservers": "IP address syntax",
    "registry.url": "the path of a Sentinel URL",
    "admin.token": "length and characters, only when listen is set",
    "activity.redis": "only with [registry] kind = \"redis\" (a rule across sections)",
    "server.tls.cert": "the file must exist",
    "server.tls.key": "the file must exist",
}

STRINGS = ["", "x", "nope", "127.0.0.1:8080", "[::1]:80", "0.0.0.0:0", "1.2.3.4:65535",
           "1.2.3.4:65536", "host:99999", "localhost:", ":80", "redis://h:1/0", "unix:///s",
           "redis+sentinel://h:1/svc", "http://h", "https://h/x", "http:///x", "bad header",
           "X-Good_Name", "a*b", "pre:", "example.app", "Example.App.", "not a zone",
           "json", "text", "off", "debug", "info", "warning", "error", "static", "dns",
           "redis", "etcd", "sandboxes.toml", "0123456789abcdefXYZ"]
INTEGERS = [-1, 0, 1, 2, 100, 101, 255, 256, 1023, 1024, 1025, 65535, 65536, 100_000, 100_001,
            1 << 20, (1 << 20) + 1, 1 << 24, (1 << 24) + 1]
NUMBERS = [-1.5, -0.0, 0.0, 0.25, 3.0]
LISTS = [[], ["x"], ["localhost", "example.app"], ["127.0.0.1"], ["10.0.0.0/8"],
         ["127.0.0.1:5353"], [3000], [0], [65536], [True], ["a", 1]]
BASE = {  # what a sampled key needs from its neighbours to be judged alone
    "admin": {"token": "0123456789abcdef0123"},
}


def samples() -> list[tuple[str, str, object]]:
    out = []
    for section, table in config_schema()["properties"].items():
        for key, schema in table["properties"].items():
            if schema.get("type") == "object":
                continue  # [server.tls]: below
            for value in [*STRINGS, *INTEGERS, *NUMBERS, *LISTS, True, False]:
                out.append((section, key, value))
    return out


def config_accepts(tmp_path: Path, data: dict) -> str | None:
    """None when load_config accepts `data` written as a proxy.toml, else its problem."""
    path = tmp_path / "proxy.toml"
    path.write_text(to_toml(data))
    assert tomllib.loads(path.read_text()) == data
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("section", [s for s in config_schema()["properties"]])
def test_schema_and_parsers_agree(tmp_path, section, monkeypatch):
    monkeypatch.delenv("SANDBOX_PROXY_ADMIN_TOKEN", raising=False)
    disagreements = []
    for sec, key, value in samples():
        if sec != section:
            continue
        data = {section: {**BASE.get(section, {}), key: value}}
        by_schema = not schema_errors(data)
        problem = config_accepts(tmp_path, data)
        if by_schema == (problem is None):
            continue
        if by_schema and f"{section}.{key}" in LOOSER:
            continue
        disagreements.append(f"[{section}] {key} = {value!r}: schema "
                             f"{'accepts' if by_schema else 'rejects'}, config "
                             f"{'rejects: ' + problem if problem else 'accepts'}")
    assert not disagreements, "\n".join(disagreements)


def test_tls_table_agrees(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    for value in [*NUMBERS, -1, 0, 10, "10", True]:
        data = {"server": {"tls": {"cert": str(cert), "key": str(key), "reload_interval": value}}}
        assert (not schema_errors(data)) == (config_accepts(tmp_path, data) is None), value
    for data in ({"server": {"tls": {"cert": str(cert)}}}, {"server": {"tls": {"x": 1}}}):
        assert schema_errors(data) and config_accepts(tmp_path, data)


def test_unknown_sections_and_keys_are_refused_by_both(tmp_path):
    for data in ({"bogus": {}}, {"server": {"lisen": "1:2"}}, {"log": {"colour": 1}}):
        assert schema_errors(data) and config_accepts(tmp_path, data), data
