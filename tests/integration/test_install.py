"""A normal install works: the wheel, installed into a fresh venv, runs its commands.

The wheel is built from a copy of the sources (nothing written into the tree) and installed with
pip into a new virtual environment. Its dependencies are not downloaded again: the environment
gets exactly the distributions the wheel's metadata requires (and theirs, recursively), linked
from the test's own environment, so a dependency the package uses but does not declare fails
here as it would for a user, and the test needs no network and stays within seconds. Each
command then runs from a temporary directory, away from the sources.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SOURCES = ("pyproject.toml", "README.md", "streamer")


def _build_wheel(work: Path) -> Path:
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    dist = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), "."],
        cwd=source,
        check=True,
        timeout=240,
    )
    [wheel] = dist.glob("streamer-*.whl")
    return wheel


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(name).decode())
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def _closure(requirements: list[Requirement]) -> list[importlib.metadata.Distribution]:
    """The installed distributions `requirements` need (no extras asked), recursively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [(requirement, frozenset[str]()) for requirement in requirements]
    while pending:
        requirement, extras = pending.pop()
        if requirement.marker is not None and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in extras or {""}
        ):
            continue
        name = canonicalize_name(requirement.name)
        distribution = importlib.metadata.distribution(name)
        assert distribution.version in requirement.specifier or not requirement.specifier, (
            f"{name} {distribution.version} does not satisfy {requirement}"
        )
        asked = frozenset(requirement.extras)
        key = f"{name}[{','.join(sorted(asked))}]"
        if key in found:
            continue
        found[key] = distribution
        pending.extend((Requirement(line), asked) for line in distribution.requires or [])
    return list({d.metadata["Name"]: d for d in found.values()}.values())


def _link(distribution: importlib.metadata.Distribution, site_packages: Path) -> None:
    """Make `distribution` importable in `site_packages` (its top-level files, linked)."""
    root = Path(str(distribution.locate_file("")))
    for top in {Path(str(file)).parts[0] for file in distribution.files or []}:
        if top in {"..", "__pycache__"} or top.endswith(".pth"):
            continue
        target = site_packages / top
        if not target.exists():
            target.symlink_to(root / top)


def test_wheel_installs_and_trains_from_a_fresh_venv(tmp_path: Path) -> None:
    """Build the wheel, install it into a new venv, run `streamer train` and `score` outside."""
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "streamer/schemas/transaction.avsc" in names
    assert "streamer/schemas/verdict.avsc" in names

    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(environment)
    python = environment / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    for distribution in _closure(_requirements(wheel)):
        _link(distribution, site_packages)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=120,
    )  # fmt: skip

    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {name: value for name, value in os.environ.items() if not name.startswith("STREAMER_")}
    env.pop("PYTHONPATH", None)
    streamer = environment / "bin" / "streamer"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(streamer), *args],
            cwd=run_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, f"streamer {' '.join(args)}:\n{result.stderr[-3000:]}"
        return result

    located = subprocess.run(
        [python, "-c", "import streamer.serde as s; print(s.__file__)"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(located).is_relative_to(site_packages), located

    run("train", "--size", "20000")
    assert (run_dir / "models" / "fraud-model.skops").is_file()
    assert (run_dir / "models" / "fraud-model.card.json").is_file()

    # Batch scoring from the installed package: a CSV of synthetic events in, verdicts out.
    write_csv = (
        "import csv\n"
        "from streamer.synthetic import SyntheticWorld\n"
        "items = list(SyntheticWorld(3).generate(500))\n"
        "with open('events.csv', 'w', newline='') as out:\n"
        "    writer = csv.DictWriter(out, fieldnames=list(items[0].record))\n"
        "    writer.writeheader()\n"
        "    writer.writerows(item.record for item in items)\n"
    )
    subprocess.run([python, "-c", write_csv], cwd=run_dir, env=env, check=True, timeout=120)
    scored = run("score", "--input", "events.csv", "--output", "verdicts.csv")
    assert "scored 500 of 500 rows" in scored.stdout
    assert len((run_dir / "verdicts.csv").read_text().splitlines()) == 501
