"""The wheel: it carries the twistd dropin and the bundled plugins, and works when installed.

The files a clone would hold are copied out of the working tree first, so the build
writes its build/ and egg-info directories under tmp_path, never into the repository. The
wheel is installed (not editable) into a fresh venv; the relay's dependencies come from the
project's venv through PYTHONPATH, which, unlike a site directory, runs no .pth file, so
neither the editable install nor the repository root is visible to the installed copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.system.harness import RelayProcess, write_relay_config

pytestmark = [pytest.mark.system, pytest.mark.slow]

REPOSITORY = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT_SECONDS = 120.0
#: twistd's console script, for a venv that has no twistd script of its own.
TWISTD_MAIN = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS, check=False, **kwargs
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree."""
    directory = tmp_path_factory.mktemp("packaging")
    source = directory / "source"
    # What a clone holds: tracked files and new ones not ignored (no .venv, build/, caches).
    listing = _run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPOSITORY
    )
    for name in filter(None, listing.stdout.split("\0")):
        origin = REPOSITORY / name
        if origin.is_file():  # a tracked file deleted in the working tree is skipped
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / name)
    dist = directory / "dist"
    # Isolated, as a plain `pip install .` builds: the build requirements of pyproject.toml
    # (setuptools>=68, wheel) are installed into a throwaway environment, not taken from
    # the project venv.
    _run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--outdir",
            str(dist),
            str(source),
        ]
    )
    (built,) = dist.glob("twistedrelay-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(venv bin directory, environment) of a venv holding only the installed wheel."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ]
    )
    dependencies = sysconfig.get_paths()["purelib"]  # the project venv: twisted, dnspython, …
    environment = {
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin",
        "PYTHONPATH": dependencies,
        "HOME": str(venv),
        "LANG": "C.UTF-8",
    }
    return venv / "bin", environment


def test_wheel_contains_the_dropin_the_package_its_default_config_and_the_plugins(wheel) -> None:
    """The wheel ships twisted/plugins/twistedrelay_plugin.py, default.toml and the plugins."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/twistedrelay_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names  # would shadow Twisted's own plugins
    assert "twisted/__init__.py" not in names
    assert {"twistedrelay/__init__.py", "twistedrelay/app.py", "twistedrelay/default.toml"} <= names
    assert {"twistedrelay/queue/store.py", "twistedrelay/smtp/server.py"} <= names
    assert "twistedrelay_plugins/__init__.py" in names
    assert any(
        n.startswith("twistedrelay_plugins/") and n != "twistedrelay_plugins/__init__.py"
        for n in names
    )
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert (
        "twistedrelay = twistedrelay.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


def test_installed_wheel_is_imported_from_the_venv_not_the_repository(installed, tmp_path) -> None:
    """The installed copy is what runs: twistedrelay and its plugins come from the new venv."""
    bin_directory, environment = installed
    result = _run(
        [
            str(bin_directory / "python"),
            "-c",
            "import twistedrelay, twistedrelay_plugins, twisted.plugins.twistedrelay_plugin as p;"
            "print(twistedrelay.__file__); print(twistedrelay_plugins.__file__); print(p.__file__)",
        ],
        cwd=tmp_path,
        env=environment,
    )
    venv = str(bin_directory.parent)
    for line in result.stdout.splitlines():
        assert line.startswith(venv), result.stdout


def test_installed_console_script_prints_the_version(installed, tmp_path) -> None:
    """``twistedrelay --version`` works from the installed console script."""
    bin_directory, environment = installed
    result = _run([str(bin_directory / "twistedrelay"), "--version"], cwd=tmp_path, env=environment)
    assert result.stdout.startswith("twistedrelay ")


def test_installed_twistd_and_twist_list_the_relay(installed, tmp_path) -> None:
    """After a plain install, ``twistd --help`` and ``twist --help`` list twistedrelay."""
    bin_directory, environment = installed
    python = str(bin_directory / "python")
    for argv in ([python, "-c", TWISTD_MAIN, "--help"], [python, "-m", "twisted", "--help"]):
        result = subprocess.run(
            argv,
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "twistedrelay" in result.stdout, result.stdout + result.stderr


def test_installed_relay_runs_under_twistd(installed, tmp_path) -> None:
    """``twistd -n twistedrelay --config FILE`` from the installed wheel greets, stops with 0."""
    bin_directory, environment = installed
    config = write_relay_config(tmp_path, route="127.0.0.1:25", workers=1)
    relay = RelayProcess(
        config,
        tmp_path / "run",
        twistd=(str(bin_directory / "python"), "-c", TWISTD_MAIN),
        environment=environment,
    )
    try:
        relay.wait_ready(workers=1)
        assert relay.terminate() == 0, relay.log()
    finally:
        relay.cleanup()
