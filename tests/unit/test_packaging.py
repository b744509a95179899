"""Packaging: the license, pyproject.toml's metadata as the installed distribution carries it,
and constraints.txt, the pinned versions the image is built from and the tests run against."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path

import trove_classifiers
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:5] == ["Apache", "License", "Version", "2.0,", "January"]
    for heading in ("TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
                    "9. Accepting Warranty or Additional Liability.",
                    "END OF TERMS AND CONDITIONS"):
        assert heading in text
    assert PROJECT["license"] == "Apache-2.0"  # an SPDX expression (PEP 639)
    assert PROJECT["license-files"] == ["LICENSE"]
    assert any(Requirement(r).name == "setuptools" and Requirement(r).specifier.contains("77")
               for r in PYPROJECT["build-system"]["requires"])


def test_classifiers_are_pypis_and_match_what_is_supported():
    classifiers = PROJECT["classifiers"]
    assert len(classifiers) == len(set(classifiers))
    unknown = [c for c in classifiers if c not in trove_classifiers.classifiers]
    assert not unknown, unknown
    assert not [c for c in classifiers if c in trove_classifiers.deprecated_classifiers]
    # the license is the SPDX expression; PEP 639 forbids License :: classifiers beside it
    assert not [c for c in classifiers if c.startswith("License ::")]
    versions = {c.rsplit(" :: ", 1)[1] for c in classifiers
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert versions and all(SpecifierSet(PROJECT["requires-python"]).contains(v + ".0")
                            for v in versions)
    image = re.search(r"^FROM python:(\d+\.\d+)\.", (ROOT / "Dockerfile").read_text(), re.M)
    assert image.group(1) in versions, "the image's Python is a listed version"


def test_project_urls():
    urls = PROJECT["urls"]
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


def test_installed_metadata_carries_license_classifiers_and_urls():
    meta = metadata.metadata("sandbox-proxy")
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta.get_all("Classifier") == PROJECT["classifiers"]
    assert {u.split(", ", 1)[0] for u in meta.get_all("Project-URL")} == set(PROJECT["urls"])


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), f"not pinned: {line}"
        pins[canonicalize_name(name)] = version
    return pins


def runtime_closure() -> dict[str, list[SpecifierSet]]:
    """Every distribution the project needs at run time (no extras), with the specifiers
    asked of it, from the installed distributions' metadata."""
    wanted: dict[str, list[SpecifierSet]] = {}
    todo = list(metadata.requires("sandbox-proxy") or [])
    while todo:
        requirement = Requirement(todo.pop())
        if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        first = name not in wanted
        wanted.setdefault(name, []).append(requirement.specifier)
        if first:
            todo += metadata.requires(name) or []
    return wanted


def test_constraints_pin_every_runtime_dependency_and_the_tests_use_them():
    pins = constraints()
    closure = runtime_closure()
    assert {"aiohttp", "uvloop", "httptools", "dnspython", "redis"} <= set(closure)
    missing = sorted(set(closure) - set(pins))
    assert not missing, f"not pinned in constraints.txt (make constraints): {missing}"
    for name, specifiers in closure.items():
        for specifier in specifiers:
            assert specifier.contains(pins[name], prereleases=True), (name, pins[name], specifier)
        # `make` installs with constraints.txt: what the tests run is what the image ships
        assert metadata.version(name) == pins[name], (name, metadata.version(name), pins[name])
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    for requirement in build:
        assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)])
    extra = sorted(set(pins) - set(closure) - {canonicalize_name(r.name) for r in build})
    assert not extra, f"pinned but not needed: {extra}"
