"""The CLI: every subcommand answers --help, and user errors are one readable line."""

import subprocess
import sys

import pytest

from expertplane.cli.main import SUBCOMMANDS, build_parser


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([name, "--help"])
    assert exc.value.code == 0
    assert "usage: expertplane" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "expertplane.cli.main", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "expertplane" in out.stdout
