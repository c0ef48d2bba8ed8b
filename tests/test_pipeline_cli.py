"""``expertplane pipeline`` on the shipped profiles."""

import json
import subprocess
import sys

import pytest

from expertplane.cli.main import main
from expertplane.cli.pipeline import parse_bytes


def test_json_output_and_plot(tmp_path, capsys):
    png = tmp_path / "timeline.png"
    assert main(["pipeline", "--profile", "deepseek-v3-like", "--stages", "4", "--schedule",
                 "zb1p", "--micro-batches", "8", "--memory-limit", "200GiB", "--plot", str(png),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["boundaries"][0] == 0 and doc["boundaries"][-1] == 63
    assert len(doc["boundaries"]) == 5 and doc["optimal"] is True
    assert all(r["peak_memory_bytes"] <= 200 * 2**30 for r in doc["ranks_detail"])
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_text_output_from_a_profile_file(capsys):
    from expertplane.planner.pipeline import shipped_profiles
    path = shipped_profiles()["llama-like"]
    assert main(["pipeline", "--profile", str(path), "--stages", "4", "--schedule", "dualpipe",
                 "--micro-batches", "8", "--overlap", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "boundaries" in out and "step time" in out and "bubble" in out
    assert "rank" in out and "memory GiB" in out


def test_infeasible_memory_is_one_line_exit_2(capsys):
    assert main(["pipeline", "--profile", "llama-like", "--stages", "4",
                 "--memory-limit", "10GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "memory_limit:" in err and "over the limit" in err


def test_bad_schedule_and_size():
    with pytest.raises(SystemExit):
        main(["pipeline", "--profile", "llama-like", "--stages", "4", "--schedule", "gpipe"])
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("1.5e9") == 1.5e9
    with pytest.raises(Exception):
        parse_bytes("eighty")
    with pytest.raises(Exception, match="'80' has no unit and would be 80 bytes; give one, e.g. 80GiB"):
        parse_bytes("80")         # a forgotten unit, not 80 bytes


def test_help_is_fast_and_lists_options():
    out = subprocess.run([sys.executable, "-m", "expertplane.cli.main", "pipeline", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for option in ("--profile", "--stages", "--schedule", "--micro-batches", "--memory-limit",
                   "--p2p", "--plot", "--json"):
        assert option in out

