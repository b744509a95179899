"""Config validation: defaults, every documented key accepted, bad values named."""

import re
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_config
from proxy.registry.static import load_registry_file

ROOT = Path(__file__).resolve().parent.parent.parent


def write(tmp_path, text, name="proxy.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_config_loads_and_documents_every_key():
    config = load_config(ROOT / "config" / "proxy.toml")
    assert str(config.server.listen) == "127.0.0.1:8080"
    assert config.server.domains == {"localhost"}
    assert config.registry.path == ROOT / "config" / "sandboxes.toml"
    text = (ROOT / "config" / "proxy.toml").read_text()
    for line in text.splitlines():
        if re.match(r"^[a-z_]+ *=", line):
            assert "#" in line, f"undocumented key: {line}"
    assert load_registry_file(config.registry.path)["demo"].host == "127.0.0.1"


@pytest.mark.parametrize("text, key", [
    ('[server]\nlisten = "nope"', "[server] listen"),
    ('[server]\nlisten = "1.2.3.4:99999"', "[server] listen"),
    ('[server]\ndomains = []', "[server] domains"),
    ('[server]\ndomains = "localhost"', "[server] domains"),
    ('[server]\nworkers = -1', "[server] workers"),
    ('[server]\nworkers = true', "[server] workers"),
    ('[server]\ntrusted_proxies = ["10.0.0.0/99"]', "[server] trusted_proxies"),
    ('[server]\ntrusted_proxies = [10]', "[server] trusted_proxies"),  # not 0.0.0.10
    ('[upstream]\nallowed_networks = [167772160]', "[upstream] allowed_networks"),
    ('[log]\nformat = "xml"', "[log] format"),
    ('[metrics]\nready_requires_registry = "yes"', "[metrics] ready_requires_registry"),
    ('[server]\nlisen = "1:2"', "[server] lisen"),
    ('[registry]\nkind = "etcd"', "[registry] kind"),
    ('[timeouts]\nconnect = 0', "[timeouts] connect"),
    ('[timeouts]\nclient_idle = "x"', "[timeouts] client_idle"),
    ('[upstream]\nconnect_attempts = 0', "[upstream] connect_attempts"),
    ('[upstream]\nmask_origin = 1', "[upstream] mask_origin"),
    ('[limits]\nmax_header_bytes = 10', "[limits] max_header_bytes"),
    ('[metrics]\nlisten = "x"', "[metrics] listen"),
    ('[bogus]\nx = 1', "[bogus]"),
    ('[server\n', "invalid TOML"),
])
def test_bad_values_name_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert key in str(info.value)


def test_listen_override_and_relative_registry(tmp_path):
    path = write(tmp_path, '[registry]\npath = "r.toml"\n[metrics]\nlisten = ""')
    config = load_config(path, "[::1]:9000")
    assert config.server.listen.host == "::1" and config.server.listen.port == 9000
    assert config.registry.path == tmp_path / "r.toml"
    assert config.metrics.listen is None
    with pytest.raises(ConfigError, match="--listen"):
        load_config(path, "nonsense")


@pytest.mark.parametrize("text, problem", [
    ('[sandboxes.demo]\nports = {}', "[sandboxes.demo] host"),
    ('[sandboxes.demo]\nhost = "h"\nextra = 1', "[sandboxes.demo] extra: unknown key"),
    ('[sandboxes.Demo]\nhost = "h"', "[sandboxes.Demo] sandbox id"),
    ('[sandboxes.demo]\nhost = "h"\nports = { 3000 = 0 }', "[sandboxes.demo] ports"),
    ('[sandboxes.demo]\nhost = "h"\nports = { x = 1 }', "[sandboxes.demo] ports"),
    ('[sandboxes.demo]\nhost = "h"\nmask_request_host = "a\\nb"',
     "[sandboxes.demo] mask_request_host"),
    ('[other]\nx = 1', "[other]"),
])
def test_bad_registry_entries(tmp_path, text, problem):
    path = write(tmp_path, text, "sandboxes.toml")
    with pytest.raises(ConfigError) as info:
        load_registry_file(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_registry_record_mask_and_ports(tmp_path):
    path = write(tmp_path, '[sandboxes.abc]\nhost = "10.0.0.1"\n'
                           'mask_request_host = "localhost:${PORT}"\nports = { 3000 = 32768 }',
                 "sandboxes.toml")
    record = load_registry_file(path)["abc"]
    assert record.backend_port(3000) == 32768 and record.backend_port(80) == 80
    assert record.masked_host(3000) == b"localhost:3000"
