"""The `digitnet` console script."""

from __future__ import annotations

import subprocess
import sys

import pytest

from digitnet import __version__
from digitnet.cli import COMMANDS, main


def test_version_and_commands_are_listed(capsys):
    assert (
        subprocess.run(
            [sys.executable, "-m", "digitnet.cli", "--version"], capture_output=True, text=True
        ).stdout.strip()
        == f"digitnet {__version__}"
    )
    with pytest.raises(SystemExit) as exit_:
        main(["-h"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in COMMANDS)


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_command_errors_are_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.ckpt" in err and "Traceback" not in err
