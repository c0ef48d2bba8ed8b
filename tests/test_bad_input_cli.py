"""Bad input to ``expertplane plan`` and ``pipeline`` that used to slip through: each ends in ONE
readable line naming what is wrong (exit 2), or, for a 3-D load file, one line saying what was
done with it."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from expertplane.cli.main import main

PLAN = ["--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8"]


def _error(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:            # argparse refuses an option's value
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len([ln for ln in err if "error" in ln]) == 1, err
    return err[-1]


@pytest.mark.parametrize("loads, message", [
    (np.full((2, 16), 1e306), "layer 0 sums to 1.6e+307, beyond 3.4e+38 (the planner adds loads in "
                              "float32, as DeepSeek's EPLB does): scale the loads down"),
    (np.ones((16, 2)), "the loads' shape [16, 2] looks transposed: they must be [layers, experts], "
                       "i.e. [2, 16]"),
])
def test_plan_refuses_loads(tmp_path, capsys, loads, message):
    np.save(tmp_path / "w.npy", loads)
    assert message in _error(capsys, ["plan", "--loads", str(tmp_path / "w.npy"), *PLAN])


def test_three_dimensional_loads_are_summed_with_one_line(tmp_path, capsys, caplog):
    np.save(tmp_path / "w.npy", np.ones((3, 2, 16)))
    with caplog.at_level(logging.WARNING):
        assert main(["plan", "--loads", str(tmp_path / "w.npy"), *PLAN,
                     "-o", str(tmp_path / "p.json")]) == 0
    [note] = [r.getMessage() for r in caplog.records if r.name == "expertplane.planner.io"]
    assert "holds a 3-D array [3, 2, 16]: summed over its first 1 dimension(s)" in note
    assert "into [layers, experts] [2, 16]" in note


def test_output_into_a_missing_folder(tmp_path, capsys):
    np.save(tmp_path / "w.npy", np.ones((2, 16)))
    line = _error(capsys, ["plan", "--loads", str(tmp_path / "w.npy"), *PLAN,
                           "-o", "/nonexistent/x.json"])
    assert line == ("expertplane plan: error: /nonexistent/x.json: no such file or directory "
                    "(the folder /nonexistent does not exist)")


def test_pipeline_memory_limit_needs_a_unit(capsys):
    line = _error(capsys, ["pipeline", "--profile", "llama-like", "--stages", "4",
                           "--memory-limit", "80"])
    assert "'80' has no unit and would be 80 bytes; give one, e.g. 80GiB" in line


def test_pipeline_unknown_profile_lists_the_shipped_ones(capsys):
    line = _error(capsys, ["pipeline", "--profile", "deepseek-v4", "--stages", "4"])
    assert line == ("expertplane pipeline: error: --profile: 'deepseek-v4' is neither a file nor "
                    "a shipped profile (deepseek-v3-like, llama-like)")


def test_empty_csv_is_one_line_without_a_python_warning(tmp_path, capsys):
    import warnings

    (tmp_path / "w.csv").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # numpy's "input contained no data" would raise
        line = _error(capsys, ["plan", "--loads", str(tmp_path / "w.csv"), *PLAN])
    assert "must not be empty" in line
