"""The twistedrelay admin command: check-config validates plugin settings too."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from twistedrelay.cli import main


def test_check_config_refuses_an_unknown_plugin_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad [plugins.NAME] key fails check-config with one line naming file and key."""
    config = tmp_path / "relay.toml"
    config.write_text(
        '[plugins]\nenabled = ["rate_limit"]\n'
        "[plugins.rate_limit]\nper_client = { messages = 1, window_seconds = 60 }\nbogus = 1\n"
    )
    assert main(["check-config", str(config)]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"{config}: plugins.rate_limit.bogus")
    assert "\n" not in error


def test_check_config_sets_plugins_up_without_leaving_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Good plugin settings pass, and checking creates nothing next to the queue."""
    config = tmp_path / "relay.toml"
    queue = tmp_path / "queue"
    config.write_text(
        f'[queue]\ndirectory = "{queue}"\n[plugins]\nenabled = ["rate_limit", "example"]\n'
        "[plugins.rate_limit]\nper_client = { messages = 1, window_seconds = 60 }\n"
    )
    assert main(["check-config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == f"{config}: ok"
    assert not queue.exists()


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """``twistedrelay ... | head``: no BrokenPipeError traceback when the pipe closes."""
    script = os.path.join(os.path.dirname(sys.executable), "twistedrelay")
    process = subprocess.Popen([script, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command writes: its write finds no reader
    try:
        errors = process.stderr.read().decode()
        assert process.wait(timeout=30) == 1
    finally:
        process.kill()
    assert "BrokenPipeError" not in errors and "Traceback" not in errors, errors
