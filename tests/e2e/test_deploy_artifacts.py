"""The deployment artifacts against the real proxy: Dockerfile, .dockerignore,
config/prometheus.yml, config/alerts.yml, config/grafana-dashboard.json, config/kubernetes.yaml
and docs/deployment.md.

No container engine is needed: the Dockerfile is parsed, and the command its image runs (ENTRYPOINT
+ CMD, the `sandbox-proxy` console script) is run here on the container config docs/deployment.md
tells users to mount, then probed with the image's own HEALTHCHECK command. Every `sandbox_proxy_*`
name (and label) the alerts, the dashboard and the manifests use must be one a running proxy
exports on /metrics after real traffic and reloads. The Kubernetes ConfigMap's proxy.toml is run
against a real redis-server.

PyYAML is not a dependency of the project, so the YAML files are read by `load_yaml_all` below (the
block-style subset these files are written in; anything outside it is an error, never a silent
misreading). Where PyYAML happens to be installed, both readings must agree.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ListenAddress, ProxyConfig, load_config
from support.fleet import redis_server  # noqa: F401 - a fixture
from support.process import (ProxyProcess, free_port, launch_proxy, registry_toml,
                             standard_registry, to_toml, wait_ready, wait_until)
from support.raw_http import fetch, header_value

REPO = Path(__file__).resolve().parent.parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PROMETHEUS = REPO / "config" / "prometheus.yml"
ALERTS = REPO / "config" / "alerts.yml"
DASHBOARD = REPO / "config" / "grafana-dashboard.json"
KUBERNETES = REPO / "config" / "kubernetes.yaml"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"

METRIC_NAME = re.compile(r"\bsandbox_proxy_[a-z0-9_]*[a-z0-9]")
# Labels Prometheus attaches to every scraped series (the target's), not the proxy.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "cluster"}
DOCS_DOMAIN = "example.app"


# ------------------------------------------------------------------------------------------------
# A YAML reader for the subset the deployment files use
# ------------------------------------------------------------------------------------------------


class YamlSubsetError(ValueError):
    pass


def _strip_comment(text: str) -> str:
    """`text` without a trailing `# comment` (outside quotes), right-stripped."""
    quote = None
    i = 0
    while i < len(text):
        c = text[i]
        if quote == "'":
            if c == "'":
                if text[i + 1:i + 2] == "'":
                    i += 1
                else:
                    quote = None
        elif quote == '"':
            if c == "\\":
                i += 1
            elif c == '"':
                quote = None
        elif c in "'\"" and (i == 0 or text[i - 1] in " \t[,:-"):
            quote = c
        elif c == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
        i += 1
    return text.rstrip()


def _quoted_end(text: str) -> int:
    """Index just past the quoted scalar `text` starts with."""
    quote = text[0]
    i = 1
    while i < len(text):
        if quote == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if quote == "'" and text[i + 1:i + 2] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    raise YamlSubsetError(f"unterminated quoted scalar: {text!r}")


def _split_key(text: str) -> tuple[str, str] | None:
    """(key, rest) when `text` is `key: rest` or `key:`; None for a plain scalar."""
    if text[:1] in "'\"":
        end = _quoted_end(text)
        after = text[end:]
        if after == ":" or after.startswith(": "):
            return _scalar(text[:end]), after[1:].strip()
        return None
    if text[:1] in "[{":
        return None
    m = re.match(r"([^\s#][^#]*?):(?:\s+|$)", text)
    if not m:
        return None
    return m.group(1), text[m.end():].strip()


def _split_flow(inner: str) -> list[str]:
    items, depth, quote, start, i = [], 0, None, 0, 0
    while i < len(inner):
        c = inner[i]
        if quote:
            if quote == '"' and c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(inner[start:i].strip())
            start = i + 1
        i += 1
    last = inner[start:].strip()
    if last:
        items.append(last)
    return items


def _scalar(text: str):
    if text.startswith('"'):
        if _quoted_end(text) != len(text):
            raise YamlSubsetError(f"text after a quoted scalar: {text!r}")
        return json.loads(text)
    if text.startswith("'"):
        if _quoted_end(text) != len(text):
            raise YamlSubsetError(f"text after a quoted scalar: {text!r}")
        return text[1:-1].replace("''", "'")
    if text.startswith("["):
        if not text.endswith("]"):
            raise YamlSubsetError(f"flow sequence on more than one line: {text!r}")
        return [_scalar(item) for item in _split_flow(text[1:-1])]
    if text.startswith("{"):
        if text == "{}":
            return {}
        raise YamlSubsetError(f"flow mappings are outside the subset: {text!r}")
    if text[:1] in "&*!%@`|>":
        raise YamlSubsetError(f"outside the subset: {text!r}")
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text.lower() in ("true", "yes", "on"):
        return True
    if text.lower() in ("false", "no", "off"):
        return False
    if re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", text):
        return int(text)
    if re.fullmatch(r"[-+]?(\.[0-9]+|[0-9]+\.[0-9]*)([eE][-+][0-9]+)?", text):
        return float(text)
    return text


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


class _YamlDocument:
    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        self.i = 0

    def peek(self) -> tuple[int, str] | None:
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if "\t" in line[:len(line) - len(line.lstrip())]:
                raise YamlSubsetError(f"tab in indentation: {line!r}")
            text = _strip_comment(line.strip())
            if text:
                return len(line) - len(line.lstrip(" ")), text
            self.i += 1
        return None

    def parse(self):
        first = self.peek()
        if first is None:
            return None
        node = self.node(first[0])
        rest = self.peek()
        if rest is not None:
            raise YamlSubsetError(f"unexpected line {self.lines[self.i]!r}")
        return node

    def node(self, indent: int):
        at, text = self.peek()
        if _is_item(text):
            return self.sequence(at)
        if _split_key(text) is not None:
            return self.mapping(at)
        self.i += 1
        return _scalar(text)

    def value_after(self, indent: int, rest: str, allow_seq_at_same_indent: bool):
        if rest in ("|", "|-", "|+"):
            return self.block_scalar(indent, rest)
        if rest:
            return _scalar(rest)
        nxt = self.peek()
        if nxt is not None and (nxt[0] > indent or (allow_seq_at_same_indent and nxt[0] == indent
                                                     and _is_item(nxt[1]))):
            return self.node(nxt[0])
        return None

    def mapping(self, indent: int) -> dict:
        result: dict = {}
        while (head := self.peek()) is not None:
            at, text = head
            if at < indent or (at == indent and _is_item(text)):
                break
            if at > indent:
                raise YamlSubsetError(f"unexpected indentation: {self.lines[self.i]!r}")
            split = _split_key(text)
            if split is None:
                raise YamlSubsetError(f"expected `key: value`: {self.lines[self.i]!r}")
            key, rest = split
            self.i += 1
            if key in result:
                raise YamlSubsetError(f"duplicate key {key!r}")
            result[key] = self.value_after(indent, rest, allow_seq_at_same_indent=True)
        return result

    def sequence(self, indent: int) -> list:
        items: list = []
        while (head := self.peek()) is not None:
            at, text = head
            if at != indent or not _is_item(text):
                if at > indent:
                    raise YamlSubsetError(f"unexpected indentation: {self.lines[self.i]!r}")
                break
            rest = text[1:].strip()
            if rest and _split_key(rest) is not None:
                # `- key: value` opens a mapping whose keys sit where `key` does
                raw = self.lines[self.i].lstrip(" ")
                dash = re.match(r"-\s+", raw)
                column = indent + dash.end()
                self.lines[self.i] = " " * column + raw[dash.end():]
                items.append(self.mapping(column))
            else:
                self.i += 1
                items.append(self.value_after(indent, rest, allow_seq_at_same_indent=False))
        return items

    def block_scalar(self, parent_indent: int, indicator: str) -> str:
        body: list[str] = []
        content_indent = None
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if not line.strip():
                body.append("")
                self.i += 1
                continue
            indent = len(line) - len(line.lstrip(" "))
            if content_indent is None:
                if indent <= parent_indent:
                    break
                content_indent = indent
            if indent < content_indent:
                break
            body.append(line[content_indent:])
            self.i += 1
        trailing = 0
        while body and body[-1] == "":
            body.pop()
            trailing += 1
        text = "\n".join(body)
        if indicator == "|":
            return text + "\n" if body else ""
        if indicator == "|+":
            return text + "\n" * (1 + trailing) if body else "\n" * trailing
        return text


def load_yaml_all(text: str) -> list:
    """The documents of a YAML stream (documents holding only comments are left out)."""
    documents: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.rstrip() == "---" or line.startswith("--- "):
            documents.append([])
            continue
        documents[-1].append(line)
    parsed = []
    for lines in documents:
        if any(_strip_comment(line.strip()) for line in lines):
            parsed.append(_YamlDocument(lines).parse())
    try:
        import yaml
    except ImportError:
        return parsed
    assert parsed == [d for d in yaml.safe_load_all(text) if d is not None], \
        "the subset reader and PyYAML disagree"
    return parsed


def load_yaml(path: Path):
    documents = load_yaml_all(path.read_text())
    assert len(documents) == 1, f"{path}: expected one YAML document, got {len(documents)}"
    return documents[0]


def test_yaml_subset_reader():
    text = (
        "# comment\n---\n"
        "a: 1\n"
        "b: 'it''s' # trailing\n"
        'c: "x # not a comment"\n'
        "d: [x, \"y, z\", 3]\n"
        "e:\n"
        "  - f: 1.5\n"
        "    g: true\n"
        "  - plain text: no\n"
        "  - host:9091\n"
        "h: |\n"
        "  line one\n"
        "    # kept\n"
        "\n"
        "  line two\n"
        "i:\n"
        "- 1\n"
        "j: {}\n"
        "---\n"
        "k: null\n"
    )
    assert load_yaml_all(text) == [
        {"a": 1, "b": "it's", "c": "x # not a comment", "d": ["x", "y, z", 3],
         "e": [{"f": 1.5, "g": True}, {"plain text": False}, "host:9091"],
         "h": "line one\n  # kept\n\nline two\n", "i": [1], "j": {}},
        {"k": None},
    ]
    for bad in ("a: 1\n  b: 2\n", "a: &anchor 1\n", "a: {b: 1}\n", "a: 1\na: 2\n",
                "a:\n  - 1\n   - 2\n"):
        with pytest.raises(YamlSubsetError):
            load_yaml_all(bad)


# ------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# ------------------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are removed by Docker
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return instructions


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions(text):
        if keyword == "FROM":
            stages.append([])
        assert stages, f"{keyword} before the first FROM"
        stages[-1].append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


class Image:
    """What the final stage of the Dockerfile runs."""

    def __init__(self, text: str):
        self.stages = dockerfile_stages(text)
        final = self.stages[-1]
        self.base = final[0][1].split()[0]
        self.users = [args for keyword, args in final if keyword == "USER"]
        self.exposed = {int(p.split("/")[0]) for keyword, args in final if keyword == "EXPOSE"
                        for p in args.split()}
        entrypoints = [args for keyword, args in final if keyword == "ENTRYPOINT"]
        cmds = [args for keyword, args in final if keyword == "CMD"]
        healthchecks = [args for keyword, args in final if keyword == "HEALTHCHECK"]
        assert len(entrypoints) == 1 and len(cmds) <= 1 and len(healthchecks) == 1
        self.entrypoint = exec_form(entrypoints[0])
        # An ENTRYPOINT resets the base image's CMD: without a CMD of its own the image runs
        # the ENTRYPOINT alone.
        self.cmd = exec_form(cmds[0]) if cmds else []
        options, sep, command = healthchecks[0].partition("CMD ")
        assert sep, "HEALTHCHECK needs a CMD"
        self.healthcheck_options = options.split()
        self.healthcheck = exec_form(command.strip())
        self.env: dict[str, str] = {}
        for keyword, args in final:
            if keyword == "ENV":
                for item in shlex.split(args):
                    name, sep, value = item.partition("=")
                    assert sep, f"ENV {args}: use the NAME=value form"
                    self.env[name] = value
        # COPY <repository path> <image path>, from the build context (not --from a stage)
        self.copies = [tuple(args.split()[-2:]) for keyword, args in final
                       if keyword == "COPY" and "--from" not in args]

    @property
    def argv(self) -> list[str]:
        return self.entrypoint + self.cmd

    @property
    def config_path(self) -> str:
        """The config file the image reads: --config in CMD, else $SANDBOX_PROXY_CONFIG."""
        if "--config" in self.cmd:
            return self.cmd[self.cmd.index("--config") + 1]
        return self.env["SANDBOX_PROXY_CONFIG"]

    @property
    def uid(self) -> int:
        user = self.users[-1].split(":")[0]
        assert user.isdigit(), "USER should be numeric so runAsNonRoot can verify it"
        return int(user)


@pytest.fixture(scope="module")
def image() -> Image:
    return Image(DOCKERFILE.read_text())


# python:<major>.<minor>.<patch>-slim-<debian release>: nothing moves under a rebuild but a
# re-pushed tag of the same release.
PINNED_BASE = re.compile(r"python:3\.11\.\d+-slim-(bookworm|trixie)")


def test_dockerfile(image):
    stages = image.stages
    assert len(stages) >= 2, "multi-stage build expected"
    builder = stages[0]
    base, _, alias = builder[0][1].partition(" ")
    assert PINNED_BASE.fullmatch(base) and alias.upper() == "AS BUILDER", builder[0][1]
    assert image.base == base, "the builder and the runtime use the same base image"
    builder_runs = " ".join(args for keyword, args in builder if keyword == "RUN")
    assert "pip wheel" in builder_runs
    # every version pinned: the build installs with constraints.txt, also for its build backend
    assert "PIP_CONSTRAINT=/src/constraints.txt pip wheel" in builder_runs
    copied = [a for keyword, args in builder if keyword == "COPY" for a in args.split()[:-1]]
    assert "constraints.txt" in copied and "LICENSE" in copied
    for keyword, args in builder:
        if keyword == "COPY":
            for source in args.split()[:-1]:
                if not source.startswith("--"):
                    assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    final_runs = " ".join(args for keyword, args in stages[-1] if keyword == "RUN")
    assert "from=builder" in final_runs, "the final stage installs the builder's wheels"
    assert "-m venv" in final_runs and "--no-index" in final_runs
    # non-root
    assert image.users, "no USER in the final stage"
    assert image.users[-1].split(":")[0] not in ("root", "0")
    assert image.uid != 0
    # ports, command, health check
    assert {8080, 9091, 9092} <= image.exposed
    assert image.entrypoint == ["sandbox-proxy"]
    # the config file comes from the environment, so that `docker run IMAGE --log-level debug`
    # and `-e SANDBOX_PROXY_CONFIG=...` both work
    assert image.cmd == []
    assert image.config_path == "/etc/sandbox-proxy/proxy.toml"
    assert ("config/container/", "/etc/sandbox-proxy/") in image.copies
    assert "sandbox-proxy --check" in final_runs  # the baked config is validated at build time
    script = " ".join(image.healthcheck)
    assert image.healthcheck[0] == "python" and "urllib" in script
    assert "127.0.0.1:9091/healthz" in script
    assert not re.search(r"\b(curl|wget)\b", script)
    for keyword, args in stages[-1]:
        assert not (keyword == "RUN" and re.search(r"\b(curl|wget)\b", args)), args
    # uvloop is a dependency the image must have
    assert "uvloop" in (REPO / "pyproject.toml").read_text()
    assert "import uvloop" in final_runs


def _dockerignore_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = os.path.normpath(raw.lstrip("!").strip()).lstrip("/")
        regex = _dockerignore_regex(pattern)
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_exactly_what_the_build_needs(image):
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    # pyproject's readme and license file: the wheel build reads them
    needed = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "constraints.txt"]
    # the sources (a C module built in place for development is the build's output, not input)
    needed += [str(p.relative_to(REPO)) for p in (REPO / "proxy").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".so"]
    needed += [str(p.relative_to(REPO)) for p in (REPO / "config" / "container").rglob("*")
               if p.is_file()]
    assert "proxy/admin_openapi.json" in needed
    for path in needed:
        assert not dockerignored(path, patterns), f"{path} is needed by the build but ignored"
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "benchmarks/run.py",
                 "benchmarks/work/x/out.json", "proxy/__pycache__/cli.cpython-311.pyc",
                 "config/proxy.toml", "Dockerfile", ".hypothesis/x",
                 "proxy/_h2session.cpython-311-x86_64-linux-gnu.so"):
        assert dockerignored(path, patterns), f"{path} would be sent to the build"


def _package_data_declared(relative: str) -> bool:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package, _, name = relative.rpartition("/")
    declared = pyproject.get("tool", {}).get("setuptools", {}).get("package-data", {})
    for key in (package.replace("/", "."), "*"):
        if any(fnmatch.fnmatch(name, glob) for glob in declared.get(key, [])):
            return True
    manifest = REPO / "MANIFEST.in"
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            words = line.split()
            if words[:1] == ["include"] and relative in words[1:]:
                return True
            if words[:1] == ["graft"] and package in words[1:]:
                return True
            if (words[:1] == ["recursive-include"] and len(words) > 2 and words[1] == package
                    and any(fnmatch.fnmatch(name, g) for g in words[2:])):
                return True
    return False


def test_package_data_reaches_the_wheel():
    """The image installs a built wheel, not the source tree: data files read at run time
    (proxy/admin_openapi.json, served as GET /openapi.json) must be declared to reach it."""
    data = [str(p.relative_to(REPO)) for p in (REPO / "proxy").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc", ".so")  # .so: built from the .c
            and "__pycache__" not in p.parts]
    assert data, "expected data files in the package"
    missing = [path for path in data if not _package_data_declared(path)]
    assert not missing, f"not in a built wheel (package-data / MANIFEST.in): {missing}"


# ------------------------------------------------------------------------------------------------
# Running what the image runs
# ------------------------------------------------------------------------------------------------


def toml_block(doc: str, first_line: str) -> str:
    """The ```toml block of docs/deployment.md whose first line is `first_line`."""
    for block in re.findall(r"```toml\n(.*?)```", doc, re.DOTALL):
        if block.splitlines()[0].strip() == first_line:
            return block
    raise AssertionError(f"docs/deployment.md has no toml block starting with {first_line!r}")


def start_image_command(workdir: Path, image: Image, config: dict | None,
                        registry: dict | None, env: dict[str, str] | None = None,
                        ) -> ProxyProcess:
    """Run ENTRYPOINT + CMD as the image does: the console script next to this interpreter, the
    config directory at the place of /etc/sandbox-proxy (holding `config` as proxy.toml, or what
    the image bakes in when None), the image's SANDBOX_PROXY_* environment plus `env`, the
    working directory `/`."""
    mount_target = str(Path(image.config_path).parent)
    assert mount_target == "/etc/sandbox-proxy"
    conf_dir = workdir / "etc-sandbox-proxy"
    conf_dir.mkdir(parents=True)
    argv = [a.replace(mount_target, str(conf_dir)) for a in image.argv]
    script = Path(sys.executable).parent / argv[0]
    assert script.exists(), f"console script {argv[0]} not installed next to {sys.executable}"
    argv[0] = str(script)
    environment = {k: v.replace(mount_target, str(conf_dir)) for k, v in image.env.items()
                   if k.startswith("SANDBOX_PROXY_")}
    environment.update(env or {})
    config_path = Path(image.config_path.replace(mount_target, str(conf_dir)))
    if config is None:  # the image's own files, where its COPY puts them
        for source, target in image.copies:
            if target.rstrip("/") == mount_target:
                for path in (REPO / source).iterdir():
                    (conf_dir / path.name).write_bytes(path.read_bytes())
        config = tomllib.loads(config_path.read_text())
    else:
        config_path.write_text(to_toml(config))
    registry_path = conf_dir / "sandboxes.toml"
    if registry is not None:
        registry_path.write_text(registry_toml(registry))
    stdout_path, stderr_path = workdir / "proxy.stdout", workdir / "proxy.stderr"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, cwd="/", stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", **environment))
    listen = environment.get("SANDBOX_PROXY_LISTEN") or config["server"]["listen"]
    metrics = environment.get("SANDBOX_PROXY_METRICS_LISTEN") or config["metrics"]["listen"]
    domains = environment.get("SANDBOX_PROXY_DOMAINS", "").replace(",", " ").split()
    p = ProxyProcess(proc=proc, port=int(listen.rsplit(":", 1)[1]),
                     metrics_port=int(metrics.rsplit(":", 1)[1]),
                     workdir=workdir, config_path=config_path, registry_path=registry_path,
                     stdout_path=stdout_path, stderr_path=stderr_path,
                     domains=domains or list(config["server"]["domains"]))
    try:
        wait_ready(p)
    except BaseException:
        p.stop(grace=2)
        raise
    return p


def on_free_ports(config: dict) -> dict:
    """The same config on free ports, all interfaces kept, loopback backends allowed."""
    config = json.loads(json.dumps(config))
    for section in ("server", "metrics"):
        host = config[section]["listen"].rsplit(":", 1)[0]
        config[section]["listen"] = f"{host}:{free_port()}"
    config.setdefault("upstream", {})["allowed_networks"] = ["127.0.0.0/8", "::1/128"]
    return config


def run_healthcheck(image: Image, metrics_port: int) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK command, with this venv's python and the test's metrics port."""
    argv = list(image.healthcheck)
    assert argv[0] == "python"
    argv[0] = sys.executable  # on the image's PATH, `python` is the venv's interpreter
    assert sum(":9091/" in a for a in argv) == 1
    argv = [a.replace(":9091/", f":{metrics_port}/") for a in argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=10)


async def test_image_command_on_the_documented_config(tmp_path, image, backend):
    doc = DEPLOYMENT_DOC.read_text()
    assert "docker build -t sandbox-proxy ." in doc
    assert ("docker run -p 8080:8080 -p 9091:9091 -v $PWD/config:/etc/sandbox-proxy:ro "
            "sandbox-proxy") in doc
    documented = tomllib.loads(toml_block(doc, f"# {image.config_path} "
                                               "(mounted from ./config/proxy.toml)"))
    # what the docs promise about that config
    assert documented["server"]["listen"] == "0.0.0.0:8080"
    assert documented["metrics"]["listen"] == "0.0.0.0:9091"
    registry_file = documented.get("registry", {}).get("path", "sandboxes.toml")
    assert registry_file == "sandboxes.toml"
    tomllib.loads(toml_block(doc, f"# /etc/sandbox-proxy/{registry_file} "
                                  "(mounted from ./config/sandboxes.toml)"))

    config = on_free_ports(documented)
    p = start_image_command(tmp_path, image, config,
                            {"demo": {"host": "127.0.0.1", "ports": {3000: backend.port}}})
    try:
        host = f"3000-demo.{DOCS_DOMAIN}"
        r = await fetch(p, "/echo", host=host)
        assert r.status == 200, r.body
        echo = r.json()
        assert echo["raw_path"] == "/echo"
        assert header_value(echo, "X-Forwarded-Host") == host
        assert (await fetch(p, "/", host=f"3000-nope.{DOCS_DOMAIN}")).status == 502
        for path in ("/healthz", "/readyz"):
            with urllib.request.urlopen(p.metrics_url + path, timeout=5) as resp:
                assert resp.status == 200
        assert "uvloop is not available" not in p.stderr()

        check = run_healthcheck(image, p.metrics_port)
        assert check.returncode == 0, check.stderr
        assert run_healthcheck(image, free_port()).returncode != 0  # it can fail
    finally:
        code = p.stop(grace=10)
    assert code == 0, p.stderr()  # SIGTERM (docker stop) drains and exits 0
    assert run_healthcheck(image, p.metrics_port).returncode != 0


async def test_image_without_a_mount_serves_its_baked_config(tmp_path, image, backend,
                                                             redis_server):
    """`docker run sandbox-proxy` with no mount: the config the Dockerfile copies from
    config/container/ listens on all interfaces and starts; SANDBOX_PROXY_* variables make it a
    fleet member without a file of its own."""
    baked = REPO / "config" / "container" / "proxy.toml"
    config = load_config(baked, environ={})
    assert config.server.listen == ListenAddress("0.0.0.0", 8080)
    assert config.metrics.listen == ListenAddress("0.0.0.0", 9091)  # the HEALTHCHECK's port
    assert {8080, 9091} <= image.exposed
    assert config.registry.kind == "static" and config.registry.path.exists()
    assert config.admin.listen is None
    # the ports are the only change: 8080 and 9091 may be taken on this machine
    ports = {"SANDBOX_PROXY_LISTEN": f"0.0.0.0:{free_port()}",
             "SANDBOX_PROXY_METRICS_LISTEN": f"0.0.0.0:{free_port()}"}
    p = start_image_command(tmp_path / "plain", image, None, None, env=ports)
    try:
        r = await fetch(p, "/", host="3000-demo.localhost")
        assert r.status == 502 and r.json()["message"] == "The sandbox was not found"
        assert run_healthcheck(image, p.metrics_port).returncode == 0
        assert all(json.loads(line) for line in p.stderr().splitlines())  # [log] format
    finally:
        assert p.stop(grace=10) == 0, p.stderr()

    redis_server.put("demo", {"host": "127.0.0.1", "ports": {"3000": backend.port}})
    admin = free_port()
    p = start_image_command(tmp_path / "fleet", image, None, None, env={
        **ports, "SANDBOX_PROXY_DOMAINS": DOCS_DOMAIN,
        "SANDBOX_PROXY_REGISTRY_KIND": "redis", "SANDBOX_PROXY_REGISTRY_URL": redis_server.url,
        "SANDBOX_PROXY_ADMIN_LISTEN": f"0.0.0.0:{admin}",
        "SANDBOX_PROXY_ADMIN_TOKEN": "admin-token-0123456789abcdef",
        "SANDBOX_PROXY_ALLOWED_NETWORKS": "127.0.0.0/8"})
    try:
        assert (await fetch(p, "/echo", host=f"3000-demo.{DOCS_DOMAIN}")).status == 200
        assert (await fetch(p, "/echo", host="3000-demo.localhost")).status == 400

        async def admin_lists() -> bool:
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.get(
                            f"http://127.0.0.1:{admin}/sandboxes",
                            headers={"Authorization": "Bearer admin-token-0123456789abcdef"}) as r:
                        return r.status == 200 and (await r.json())["sandboxes"][0]["id"] == "demo"
            except aiohttp.ClientConnectionError:
                return False
        await wait_until(admin_lists, 5)
    finally:
        assert p.stop(grace=10) == 0, p.stderr()


# ------------------------------------------------------------------------------------------------
# What a real proxy exports
# ------------------------------------------------------------------------------------------------


class Exported:
    """Sample names and label sets of one /metrics scrape (several scrapes merged)."""

    def __init__(self) -> None:
        self.labels: dict[str, set[str]] = {}
        self.values: dict[tuple[str, str], set[str]] = {}
        self.families: set[str] = set()  # histogram and counter names without their suffixes

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            self.families.add(family.name)
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                for k, v in sample.labels.items():
                    self.values.setdefault((sample.name, k), set()).add(v)

    @property
    def names(self) -> set[str]:
        return set(self.labels)

    @property
    def all_labels(self) -> set[str]:
        return set().union(*self.labels.values())


async def scrape(p: ProxyProcess) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(p.metrics_url + "/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


async def generate_traffic(p: ProxyProcess) -> None:
    assert (await fetch(p, "/echo")).status == 200
    assert (await fetch(p, "/echo", method="POST", data=b"x" * 100)).status == 200
    assert (await fetch(p, "/echo", host=p.host("nope"))).status == 502      # not found
    assert (await fetch(p, "/echo", host=p.host("refused"))).status == 502   # connect refused
    assert (await fetch(p, "/echo", host="3000-demo.elsewhere.test")).status == 400
    # a paused sandbox whose control plane does not answer: the resume fails, 503
    assert (await fetch(p, "/echo", host=p.host("sleepy"))).status == 503
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(p.url("/ws"), headers={"Host": p.host()})
        await ws.send_str("hello")
        assert (await ws.receive(timeout=5)).data == "hello"
        await ws.close()
        async with session.get(p.url("/sse?n=2&interval=0.05"),
                               headers={"Host": p.host()}) as resp:
            await resp.read()
    # reloads: the registry file (good, then broken, then good) and the config (SIGHUP)
    sandboxes = tomllib.loads(p.registry_path.read_text())["sandboxes"]
    sandboxes["extra"] = {"host": "127.0.0.1"}
    p.write_registry(sandboxes)
    await asyncio.sleep(0.5)
    p.registry_path.write_text("[sandboxes.Bad_Id]\nhost = 1\n")
    await asyncio.sleep(0.5)
    del sandboxes["extra"]
    p.write_registry(sandboxes)
    good = p.config_path.read_text()
    p.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.3)
    p.config_path.write_text(good + "\n[timeouts]\nconnect = -1\n")
    p.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.3)
    p.config_path.write_text(good)

    async def reloads_seen() -> bool:
        counts = {tuple(sorted(s.labels.items())): s.value
                  for f in text_string_to_metric_families(await scrape(p))
                  for s in f.samples if s.name == "sandbox_proxy_reloads_total"}
        return all(counts.get((("result", result), ("what", what)), 0) >= 1
                   for what in ("config", "registry") for result in ("ok", "error"))
    await wait_until(reloads_seen, timeout=10)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, backend, refused_port) -> Exported:
    workdir = tmp_path_factory.mktemp("deploy-metrics")
    sandboxes = standard_registry(backend.port, refused_port)
    sandboxes["sleepy"] = {"host": "127.0.0.1", "ports": {3000: backend.port},
                           "state": "paused", "auto_resume": True}
    p = launch_proxy(workdir, sandboxes, config={
        "upstream": {"connect_attempts": 2, "connect_backoff": 0.01},
        # auto-resume on, so its series exist; nothing listens at that URL
        "registry": {"resume_url": f"http://127.0.0.1:{refused_port}/resume",
                     "resume_timeout": 2.0}})
    result = Exported()
    try:
        async def run() -> None:
            await generate_traffic(p)
            result.add(await scrape(p))
        asyncio.run(run())
    finally:
        p.stop()
    return result


def promql_expressions() -> list[tuple[str, str]]:
    """(where, expression) of every PromQL expression in the alerts and the dashboard."""
    exprs = []
    for group in load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            exprs.append((f"alert {rule.get('alert')}", rule["expr"]))
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append((f"panel {panel['title']!r}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append((f"variable {var['name']}", var["definition"]))
    return exprs


def test_every_metric_name_used_is_exported(exported):
    assert len(exported.names) > 30, sorted(exported.names)
    # anywhere in the files (descriptions, comments, prose): a series or a family name
    for path in (ALERTS, DASHBOARD, KUBERNETES, PROMETHEUS, DEPLOYMENT_DOC):
        used = set(METRIC_NAME.findall(path.read_text()))
        unknown = sorted(used - exported.names - exported.families)
        assert not unknown, f"{path.relative_to(REPO)} names metrics the proxy does not " \
                            f"export: {unknown}"
    # in PromQL: series only (a histogram's or counter's family name selects nothing)
    exprs = promql_expressions()
    assert len(exprs) > 20
    for where, expr in exprs:
        unknown = sorted(set(METRIC_NAME.findall(expr)) - exported.names)
        assert not unknown, f"{where}: no such series: {unknown}"
    assert "sandbox_proxy_request_duration_seconds" not in exported.names
    assert "sandbox_proxy_request_duration_seconds" in exported.families


SELECTOR = re.compile(r"(sandbox_proxy_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def test_labels_used_are_exported(exported):
    """Label names in selectors and groupings exist; `label="value"` values were seen."""
    known = exported.all_labels | TARGET_LABELS | {"le"}
    problems = []
    for where, expr in promql_expressions():
        for name, body in SELECTOR.findall(expr):
            pos = 0
            while pos < len(body.strip()):
                m = MATCHER.match(body, pos)
                assert m, f"{where}: cannot read the selector {{{body}}}"
                pos = m.end()
                label, op, value = m.groups()
                if label in TARGET_LABELS:
                    continue
                if label not in exported.labels.get(name, set()):
                    problems.append(f"{where}: {name} has no label {label!r}")
                elif op == "=" and value not in exported.values.get((name, label), set()):
                    problems.append(f"{where}: {name}{{{label}={value!r}}} never seen")
        for group in GROUPING.findall(expr):
            for label in (g.strip() for g in group.split(",") if g.strip()):
                if label not in known:
                    problems.append(f"{where}: unknown label {label!r} in a grouping")
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), where
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                if label not in known:
                    problems.append(f"panel {panel['title']!r}: legend label {label!r}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# Prometheus: scrape config and alerts
# ------------------------------------------------------------------------------------------------


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    total, rest = 0.0, text
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d|w)", text):
        total += int(number) * units[unit]
        rest = rest.replace(number + unit, "", 1)
    assert not rest and total > 0, f"not a Prometheus duration: {text!r}"
    return total


def balanced(expr: str) -> bool:
    stack, quote = [], None
    pairs = {")": "(", "]": "[", "}": "{"}
    for i, c in enumerate(expr):
        if quote:
            if c == quote and expr[i - 1] != "\\":
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            stack.append(c)
        elif c in ")]}":
            if not stack or stack.pop() != pairs[c]:
                return False
    return not stack and quote is None


def test_prometheus_config():
    config = load_yaml(PROMETHEUS)
    assert config["rule_files"] == ["alerts.yml"]
    assert (PROMETHEUS.parent / "alerts.yml").exists()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    static = [job for job in jobs.values() if "static_configs" in job]
    assert static, "a static job"
    for job in static:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets = [t for sc in job["static_configs"] for t in sc["targets"]]
        assert targets and all(t.endswith(":9091") for t in targets), targets
    pods = [job for job in jobs.values() if "kubernetes_sd_configs" in job]
    assert len(pods) == 1 and pods[0]["kubernetes_sd_configs"] == [{"role": "pod"}]
    relabel = pods[0]["relabel_configs"]
    sources = {s for r in relabel for s in r.get("source_labels", [])}
    assert "__meta_kubernetes_pod_annotation_prometheus_io_scrape" in sources
    assert "__meta_kubernetes_pod_annotation_prometheus_io_port" in sources
    kept = {r["source_labels"][0]: r["regex"] for r in relabel if r.get("action") == "keep"}
    assert kept["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] == "true"
    # the pod job keys on what the Deployment declares
    deployment = kubernetes()["Deployment"]
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == \
        kept["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    port_name = kept["__meta_kubernetes_pod_container_port_name"]
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert ports[port_name] == 9091
    # the job names the alerts watch with `up`
    down = next(r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]
                if r["alert"] == "SandboxProxyDown")
    watched = re.search(r'up\{job=~"([^"]+)"\}', down["expr"]).group(1).split("|")
    assert set(watched) == set(jobs)


REQUIRED_ALERT_SIGNALS = {
    "5xx ratio": re.compile(r'sandbox_proxy_requests_total\{code_class="5xx"\}.*/.*'
                            r'sandbox_proxy_requests_total\[', re.DOTALL),
    "backends unreachable": re.compile(r"sandbox_proxy_upstream_connect_failures_total"),
    "registry": re.compile(r"sandbox_proxy_registry_ready"),
    "drain": re.compile(r"sandbox_proxy_draining"),
    "reload errors": re.compile(r'sandbox_proxy_reloads_total\{result="error"\}'),
    "p99 ttfb": re.compile(r"histogram_quantile\(0\.99,.*sandbox_proxy_request_duration_seconds"
                           r"_bucket", re.DOTALL),
    "fd growth": re.compile(r"sandbox_proxy_process_open_fds"),
}


def test_alert_rules():
    rules = [r for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert isinstance(rule["expr"], str) and balanced(rule["expr"]), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"]
        if "for" in rule:
            duration_seconds(rule["for"])
    for signal_name, pattern in REQUIRED_ALERT_SIGNALS.items():
        assert any(pattern.search(r["expr"]) for r in rules), f"no alert on {signal_name}"
    # the drain alert waits longer than a default drain
    defaults = ProxyConfig().server
    drain = next(r for r in rules if "sandbox_proxy_draining" in r["expr"])
    assert duration_seconds(drain["for"]) > defaults.drain_delay + defaults.drain_timeout


PROMTOOL_TESTS = REPO / "tests" / "promtool" / "alerts_test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:  # a failure in CI (SANDBOX_PROXY_NO_SKIP=1), where .ci/run installs it
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def test_alert_rules_pass_promtool(promtool):
    """Prometheus's own tool: the rules load, and their unit tests (synthetic series, which
    alerts fire and when) pass."""
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    rules = [r["alert"] for g in load_yaml(ALERTS)["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout
    unit = subprocess.run([promtool, "test", "rules", str(PROMTOOL_TESTS)], capture_output=True,
                          text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    tested = set(re.findall(r"alertname: (\w+)", PROMTOOL_TESTS.read_text()))
    assert {"SandboxProxyFileDescriptorsGrowing", "SandboxProxyRegistryUnavailable"} <= tested
    assert tested <= set(rules)


# ------------------------------------------------------------------------------------------------
# Grafana
# ------------------------------------------------------------------------------------------------

DASHBOARD_METRICS = {
    "sandbox_proxy_requests_total", "sandbox_proxy_request_duration_seconds_bucket",
    "sandbox_proxy_client_connections", "sandbox_proxy_requests_in_flight",
    "sandbox_proxy_open_streams", "sandbox_proxy_upstream_connections",
    "sandbox_proxy_upstream_idle_connections",
    "sandbox_proxy_upstream_connect_duration_seconds_bucket",
    "sandbox_proxy_upstream_connect_failures_total", "sandbox_proxy_upstream_retries_total",
    "sandbox_proxy_registry_lookups_total", "sandbox_proxy_registry_lookup_duration_seconds_bucket",
    "sandbox_proxy_reloads_total", "sandbox_proxy_draining", "sandbox_proxy_request_bytes_total",
    "sandbox_proxy_response_bytes_total", "sandbox_proxy_resumes_total",
    # the README's leak criteria, graphable
    "sandbox_proxy_process_resident_memory_bytes", "sandbox_proxy_process_open_fds",
    "sandbox_proxy_process_max_fds", "sandbox_proxy_process_cpu_seconds_total",
    "sandbox_proxy_process_start_time_seconds", "sandbox_proxy_access_log_dropped_lines_total",
}


def test_grafana_dashboard():
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(datasource) == 1 and datasource[0]["query"] == "prometheus"
    ds_ref = {"type": "prometheus", "uid": "${%s}" % datasource[0]["name"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == ds_ref, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == ds_ref
            assert balanced(target["expr"]), target["expr"]
            used.update(METRIC_NAME.findall(target["expr"]))
    missing = DASHBOARD_METRICS - used
    assert not missing, f"the dashboard shows nothing of {sorted(missing)}"


# ------------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------------


def kubernetes() -> dict[str, dict]:
    documents = load_yaml_all(KUBERNETES.read_text())
    kinds = [d["kind"] for d in documents]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service"], kinds
    for d in documents:
        assert "namespace" not in d["metadata"], f"{d['kind']} sets a namespace"
    return {d["kind"]: d for d in documents}


def configmap_config(tmp_path: Path, manifests: dict, image: Image):
    configmap = manifests["ConfigMap"]
    name = Path(image.config_path).name
    text = configmap["data"][name]
    path = tmp_path / name
    path.write_text(text)
    return text, load_config(path)


def port_number(port, container: dict) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_kubernetes_manifests(tmp_path, image):
    manifests = kubernetes()
    text, config = configmap_config(tmp_path, manifests, image)
    raw = tomllib.loads(text)
    assert config.server.listen == ListenAddress("0.0.0.0", 8080)
    assert config.metrics.listen == ListenAddress("0.0.0.0", 9091)
    assert raw["registry"]["kind"] == "redis"
    assert config.registry.url == "redis://redis:6379/0"
    assert config.registry.prefix == "sandbox:"

    deployment = manifests["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.metrics.listen.port)
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    pod_spec = pod["spec"]
    assert pod_spec["terminationGracePeriodSeconds"] > (config.server.drain_delay
                                                        + config.server.drain_timeout)
    security = pod_spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == image.uid
    [container] = pod_spec["containers"]
    assert container["image"]
    assert "command" not in container and container.get("args", image.cmd) == image.cmd
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    ports = {p["containerPort"] for p in container["ports"]}
    assert {config.server.listen.port, config.metrics.listen.port} <= ports
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz" and liveness["path"] == "/healthz"
    for probe in (readiness, liveness):
        assert port_number(probe["port"], container) == config.metrics.listen.port
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    mount = next(m for m in container["volumeMounts"]
                 if m["mountPath"] == str(Path(image.config_path).parent))
    volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), \
            "workers > 1 write their metrics snapshots under /tmp"

    service = manifests["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    [edge] = [p for p in service["spec"]["ports"] if p["port"] == 80]
    assert port_number(edge["targetPort"], container) == config.server.listen.port

    pdb = manifests["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"].get("maxUnavailable", pdb["spec"].get("minAvailable")) == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


async def test_kubernetes_config_serves_with_redis(tmp_path, image, backend, redis_server):
    """The ConfigMap's proxy.toml, started as the image starts it, against a real Redis."""
    text, _ = configmap_config(tmp_path, kubernetes(), image)
    config = on_free_ports(tomllib.loads(text))
    assert config["registry"]["url"] == "redis://redis:6379/0"
    config["registry"]["url"] = redis_server.url
    config["registry"]["timeout"] = 0.5
    domain = config["server"]["domains"][0]
    redis_server.put("demo", {"host": "127.0.0.1", "ports": {"3000": backend.port}},
                     prefix=config["registry"]["prefix"])
    p = start_image_command(tmp_path / "run", image, config, None)
    try:
        for _ in range(3):
            assert (await fetch(p, "/echo", host=f"3000-demo.{domain}")).status == 200
        assert (await fetch(p, "/echo", host=f"3000-gone.{domain}")).status == 502
        with urllib.request.urlopen(p.metrics_url + "/readyz", timeout=5) as resp:
            assert resp.status == 200
        exported = Exported()
        exported.add(await scrape(p))
        # answers from the cache (kept by keyspace notifications) count as kind="redis"
        assert "redis" in exported.values[("sandbox_proxy_registry_lookups_total", "kind")]
        unknown = set(METRIC_NAME.findall(KUBERNETES.read_text())) - exported.names
        assert not unknown

        # Redis goes away: the registry alert's condition holds, the probe still passes (one
        # Redis outage must not take every replica out of the Service at once)
        redis_server.kill()

        async def alerting() -> bool:
            samples = {s.name: s.value for f in text_string_to_metric_families(await scrape(p))
                       for s in f.samples if not s.labels}
            return samples["sandbox_proxy_registry_ready"] < samples["sandbox_proxy_workers"]
        await wait_until(alerting, timeout=15)
        with urllib.request.urlopen(p.metrics_url + "/readyz", timeout=5) as resp:
            assert resp.status == 200
        r = await fetch(p, "/echo", host=f"3000-demo.{domain}")
        assert r.status == 503 and r.json()["message"] == "registry unavailable"
        assert p.alive()
    finally:
        code = p.stop(grace=10)
    assert code == 0, p.stderr()


async def test_remote_lookups_reach_the_metrics(tmp_path, image, backend, redis_server):
    """What the dashboard's "Look-ups by outcome" and "Remote look-up latency" panels show."""
    text, _ = configmap_config(tmp_path, kubernetes(), image)
    config = on_free_ports(tomllib.loads(text))
    config["registry"]["url"] = redis_server.url
    config["server"]["drain_delay"] = 0.0
    domain = config["server"]["domains"][0]
    redis_server.put("demo", {"host": "127.0.0.1", "ports": {"3000": backend.port}})
    p = start_image_command(tmp_path / "run", image, config, None)
    try:
        assert (await fetch(p, "/echo", host=f"3000-demo.{domain}")).status == 200  # a miss
        assert (await fetch(p, "/echo", host=f"3000-gone.{domain}")).status == 502  # a miss
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(await scrape(p)) for s in f.samples}
    finally:
        p.stop(grace=10)
    assert samples.get(("sandbox_proxy_registry_lookup_duration_seconds_count", ()), 0) >= 2
    assert samples.get(("sandbox_proxy_registry_lookups_total",
                        (("kind", "redis"), ("outcome", "not_found"))), 0) >= 1


def test_docs_name_the_artifacts():
    doc = DEPLOYMENT_DOC.read_text()
    for path in (DOCKERFILE, PROMETHEUS, ALERTS, DASHBOARD, KUBERNETES):
        assert path.name in doc, f"docs/deployment.md does not mention {path.name}"
    assert "fleet.md" in doc
    for key in ("trusted_proxies", "proxy_protocol", "[server.tls]", "drain_delay",
                "drain_timeout", "SIGHUP", "workers"):
        assert key in doc, key
    # every alert the rules define is listed in the docs
    for group in load_yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            assert f"`{rule['alert']}`" in doc, rule["alert"]
    # the shell lines in the docs parse
    for block in re.findall(r"```sh\n(.*?)```", doc, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():  # continuation lines joined
            shlex.split(line.replace("…", "x"))
