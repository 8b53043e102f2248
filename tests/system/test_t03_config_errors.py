"""t03: a bad relay.toml stops twistd and ``check-config`` with one line naming file and key.

DESIGN.md: "A TOML key that is not known, or a value of the wrong kind, stops start-up with
a message that names the key and the file", before anything binds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.harness import TWISTD, closed_port

pytestmark = pytest.mark.system

TWISTEDRELAY = os.path.join(os.path.dirname(sys.executable), "twistedrelay")
EXIT_TIMEOUT_SECONDS = 20.0


def _write(directory: Path, table: str, name: str = "relay.toml") -> Path:
    """A relay.toml listening on a closed loopback port, with ``table`` appended."""
    path = directory / name
    path.write_text(
        'hostname = "relay.example.test"\n'
        f'[smtp]\nlisten = ["127.0.0.1:{closed_port()}"]\n'
        f'[queue]\ndirectory = "{directory / "queue"}"\n'
        '[metrics]\nlisten = ""\n' + table
    )
    return path


BAD_CONFIGS = {
    "unknown key": ("[workers]\ncount = 1\nbogus = 1\n", "workers.bogus"),
    "wrong type": ('[workers]\ncount = "two"\n', "workers.count"),
    "unknown table": ("[smpt]\nlisten = []\n", "smpt"),
    "bad network": ('[relay]\nmynetworks = ["300.1.2.0/24"]\n', "relay.mynetworks"),
    "bad route": ('[delivery]\nroutes = { "*" = "a host:25" }\n', "delivery.routes"),
    "missing certificate": (
        '[tls]\ncertificate = "/nonexistent/cert.pem"\nprivate_key = "/nonexistent/key.pem"\n',
        "tls.certificate",
    ),
    "missing users file": ('[auth]\nusers_file = "/nonexistent/users"\n', "auth.users_file"),
    "missing CA file": ('[delivery]\nca_file = "/nonexistent/ca.pem"\n', "delivery.ca_file"),
}


def _lines_naming(output: str, config: Path, key: str) -> list[str]:
    return [line for line in output.splitlines() if str(config) in line and key in line]


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "missing certificate"])
def test_twistd_refuses_a_bad_config_before_binding_anything(tmp_path, case) -> None:
    """twistd exits non-zero at once, names file and key on one line, binds and creates nothing."""
    table, key = BAD_CONFIGS[case]
    config = _write(tmp_path, table)
    result = subprocess.run(
        [TWISTD, "--nodaemon", "--pidfile", "", "twistedrelay", "--config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_SECONDS,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert len(_lines_naming(output, config, key)) == 1, output
    assert "listening for" not in output
    assert not (tmp_path / "queue").exists()  # stopped before the master created the queue


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_check_config_rejects_a_bad_config_with_one_line(tmp_path, case) -> None:
    """``twistedrelay check-config`` exits 1 with exactly one line naming the file and key."""
    table, key = BAD_CONFIGS[case]
    config = _write(tmp_path, table)
    result = subprocess.run(
        [TWISTEDRELAY, "check-config", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert _lines_naming(result.stderr, config, key), result.stderr


def test_check_config_accepts_a_good_config(tmp_path) -> None:
    """``twistedrelay check-config`` exits 0 and says ok for a file using the contract's keys."""
    config = _write(
        tmp_path,
        '[relay]\nmynetworks = ["127.0.0.0/8", "::1/128"]\ndomains = ["example.test"]\n'
        '[workers]\ncount = 2\n[dns]\nnameservers = ["127.0.0.1:5353"]\n'
        '[delivery]\nroutes = { "example.net" = "127.0.0.1:2600", "*" = "smarthost.example:587" }\n'
        "smtp_port = 2525\nminimal_backoff = 1\nmaximal_backoff = 10\n"
        "maximal_queue_lifetime = 3600\n",
    )
    result = subprocess.run(
        [TWISTEDRELAY, "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{config}: ok\n"
