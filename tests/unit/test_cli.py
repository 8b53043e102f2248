"""The twistedrelay admin command: check-config validates plugin settings too."""

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
