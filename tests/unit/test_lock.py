"""The lock files agree with pyproject.toml: `make lock` ran after the last dependency change."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
DEV_LOCK = ROOT / "requirements-dev.lock"
DEV_EXTRAS = ("dev", "bench")
"""The extras `make venv` installs through requirements-dev.lock."""

_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)(?:\s*;\s*(?P<marker>.+))?$"
)
"""`name==version`, and an environment marker when the dependency has one (`; sys_platform ...`)."""


def read_lock(path: Path) -> dict[NormalizedName, Version]:
    """Every `name==version` line of a lock file; anything else but comments is an error."""
    pins: dict[NormalizedName, Version] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PIN.match(line)
        assert match is not None, f"{path.name}:{number}: not an exact pin: {raw!r}"
        name = canonicalize_name(match["name"])
        assert name not in pins, f"{path.name}:{number}: {name} pinned twice"
        pins[name] = Version(match["version"])
    return pins


def applies(requirement: Requirement, extra: str = "") -> bool:
    """Whether the requirement applies on this Python (the image's: see the header test)."""
    if requirement.marker is None:
        return True
    return requirement.marker.evaluate({"extra": extra})


def assert_pinned(requirement: Requirement, pins: dict[NormalizedName, Version], lock: str) -> None:
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{requirement} is not in {lock}: run `make lock`"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"{lock} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}: run `make lock`"
    )


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)


@pytest.fixture(scope="module")
def runtime(pyproject: dict[str, Any]) -> list[Requirement]:
    return [Requirement(text) for text in pyproject["project"]["dependencies"]]


@pytest.fixture(scope="module")
def build(pyproject: dict[str, Any]) -> list[Requirement]:
    return [Requirement(text) for text in pyproject["build-system"]["requires"]]


@pytest.fixture(scope="module")
def dev(pyproject: dict[str, Any]) -> list[Requirement]:
    extras = pyproject["project"]["optional-dependencies"]
    return [Requirement(text) for extra in DEV_EXTRAS for text in extras[extra]]


class TestLockFiles:
    def test_every_line_is_an_exact_pin(self) -> None:
        """Both files are flat `name==version` lists, each name once (a pip-compile output)."""
        assert read_lock(LOCK)
        assert read_lock(DEV_LOCK)

    def test_runtime_dependencies_are_pinned_within_their_specifiers(
        self, runtime: list[Requirement]
    ) -> None:
        """Each dependency of pyproject.toml is in requirements.lock, at a version it allows."""
        pins = read_lock(LOCK)
        for requirement in filter(applies, runtime):
            assert_pinned(requirement, pins, LOCK.name)

    def test_dev_extras_are_pinned_within_their_specifiers(
        self, runtime: list[Requirement], dev: list[Requirement]
    ) -> None:
        """The dev lock holds the runtime dependencies and the extras `make venv` installs."""
        pins = read_lock(DEV_LOCK)
        for requirement in filter(applies, [*runtime, *dev]):
            assert_pinned(requirement, pins, DEV_LOCK.name)

    def test_build_backend_is_pinned(self, build: list[Requirement]) -> None:
        """setuptools and wheel are locked too: the package is built without build isolation."""
        for lock in (LOCK, DEV_LOCK):
            pins = read_lock(lock)
            for requirement in build:
                assert_pinned(requirement, pins, lock.name)

    def test_extras_of_dependencies_are_pinned(self, runtime: list[Requirement]) -> None:
        """A dependency's extras (confluent-kafka[schemaregistry]) bring their packages along.

        The lock lists no extras (pip-compile --strip-extras, so it can constrain the dev lock);
        what they require, read from the installed distribution, must be pinned instead.
        """
        pins = read_lock(LOCK)
        checked = 0
        for requirement in filter(applies, runtime):
            for extra in requirement.extras:
                for text in metadata.requires(requirement.name) or []:
                    needed = Requirement(text)
                    if needed.marker is not None and applies(needed, extra) != applies(needed):
                        assert_pinned(needed, pins, LOCK.name)
                        checked += 1
        assert checked > 0, "no dependency extra found: the test would check nothing"

    def test_dev_lock_keeps_the_runtime_pins(self) -> None:
        """The venv runs exactly the image's versions: the dev lock only adds packages."""
        runtime, dev = read_lock(LOCK), read_lock(DEV_LOCK)
        differ = {name: (v, dev.get(name)) for name, v in runtime.items() if dev.get(name) != v}
        assert not differ, f"requirements-dev.lock disagrees with requirements.lock: {differ}"

    def test_scikit_learn_is_pinned(self) -> None:
        """The model card names the exact scikit-learn version; the lock fixes it for the image."""
        assert canonicalize_name("scikit-learn") in read_lock(LOCK)

    def test_locked_for_the_image_python(self) -> None:
        """The locks were resolved with the Python the image runs (markers depend on it)."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        image = re.search(r"^FROM python:(\d+\.\d+)", dockerfile, re.MULTILINE)
        assert image is not None
        for lock in (LOCK, DEV_LOCK):
            header = re.search(r"with Python (\d+\.\d+)", lock.read_text())
            assert header is not None, lock.name
            assert header.group(1) == image.group(1), (lock.name, header.group(1))


class TestChecks:
    """The helpers above catch what they are meant to."""

    def test_version_outside_the_specifier_fails(self) -> None:
        """A pin that pyproject no longer allows is reported with the fix."""
        pins = {canonicalize_name("numpy"): Version("1.25.0")}
        with pytest.raises(AssertionError, match="make lock"):
            assert_pinned(Requirement("numpy>=1.26"), pins, "requirements.lock")

    def test_missing_dependency_fails(self) -> None:
        """A dependency added to pyproject but not locked is reported."""
        with pytest.raises(AssertionError, match=r"not in requirements\.lock"):
            assert_pinned(Requirement("fastapi>=0.110"), {}, "requirements.lock")

    def test_names_compare_normalised(self) -> None:
        """pyproject's spelling and pip-compile's may differ in case and separators."""
        pins = {canonicalize_name("Pydantic_Settings"): Version("2.16.3")}
        assert_pinned(Requirement("pydantic-settings>=2.3"), pins, "requirements.lock")

    def test_a_loose_pin_fails(self, tmp_path: Path) -> None:
        """A range in a lock file is not a lock."""
        lock = tmp_path / "requirements.lock"
        lock.write_text("numpy>=1.26\n")
        with pytest.raises(AssertionError, match="not an exact pin"):
            read_lock(lock)
