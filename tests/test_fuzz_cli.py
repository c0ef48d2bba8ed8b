"""Property-based fuzzing (hypothesis) of the CLI's input files: ``expertplane plan --loads``,
``expertplane pipeline --profile`` and the controller's placement YAML (``--placements``).

A malformed file must end the command with exit code 2 and ONE readable line on stderr, never a
traceback; a file that happens to be valid may succeed (exit 0)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import reliability_support as rs  # noqa: E402

from expertplane.cli.main import main  # noqa: E402
from expertplane.controller.placement_files import load_placements  # noqa: E402

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=25)
numbers = st.one_of(st.integers(-5, 10 ** 6), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=4), st.none())
load_matrices = st.lists(st.lists(numbers, min_size=0, max_size=9), min_size=0, max_size=4)


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run ``expertplane ARGV`` in-process; returns (exit code, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:                       # argparse errors exit 2 by themselves
        code = exc.code
    return code, capsys.readouterr().err


def assert_clean_refusal(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("expertplane"), err
        assert len([ln for ln in lines if "error" in ln]) == 1, err


def _write(directory: str, name: str, content: str | bytes) -> str:
    path = Path(directory) / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


loads_files = st.one_of(
    st.tuples(st.just("loads.json"), json_values.map(json.dumps)),
    st.tuples(st.just("loads.json"), load_matrices.map(lambda m: json.dumps(m, allow_nan=True))),
    st.tuples(st.just("loads.csv"), load_matrices.map(
        lambda m: "\n".join(",".join(str(v) for v in row) for row in m))),
    st.tuples(st.sampled_from(["loads.npy", "loads.pt", "loads.json", "loads.csv", "loads.txt"]),
              st.binary(max_size=200)),
)


def test_fuzz_plan_loads_file(capsys):
    seen = []

    @settings(FUZZ, max_examples=300)
    @given(loads_files)
    def run(item):
        name, content = item
        with tempfile.TemporaryDirectory() as d:
            code, err = run_cli(["plan", "--loads", _write(d, name, content), "--replicas", "8",
                                 "--groups", "1", "--nodes", "1", "--gpus", "2"], capsys)
        assert_clean_refusal(code, err)
        seen.append(code)

    run()
    assert len(seen) == 300 and seen.count(2) > 200       # most generated files are malformed


profile_docs = st.one_of(
    json_values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.lists(st.dictionaries(st.sampled_from(["F", "B", "W", "kind", "repeat", "activation_bytes",
                                              "param_bytes", "ep_imbalance", "x"]),
                             numbers, max_size=6), max_size=5).map(
        lambda layers: yaml.safe_dump({"layers": layers})),
    st.text(max_size=100),
)


def test_fuzz_pipeline_profile_file(capsys):
    seen = []

    @settings(FUZZ, max_examples=300)
    @given(profile_docs, st.integers(-1, 6))
    def run(doc, stages):
        with tempfile.TemporaryDirectory() as d:
            code, err = run_cli(["pipeline", "--profile", _write(d, "p.yaml", doc),
                                 "--stages", str(stages)], capsys)
        assert_clean_refusal(code, err)
        seen.append(code)

    run()
    assert len(seen) == 300 and seen.count(2) > 200


placement_keys = ["name", "model", "topology", "num_replicas", "algorithm", "policy",
                  "initial_load", "router_bias", "bogus"]
placement_docs = st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(placement_keys), json_values, max_size=8),
    st.fixed_dictionaries({
        "name": st.sampled_from(["ok", "", "UP", "a" * 70]),
        "model": st.dictionaries(st.sampled_from(["num_layers", "num_experts", "num_groups",
                                                  "expert_bytes", "x"]), numbers, max_size=4),
        "topology": st.dictionaries(st.sampled_from(["num_nodes", "gpus_per_node"]), numbers),
        "num_replicas": numbers,
        "policy": st.dictionaries(st.sampled_from(["mode", "threshold", "window_seconds", "y"]),
                                  scalars),
    }),
)


def test_fuzz_controller_placement_yaml():
    """``load_placements`` (what ``expertplane controller --placements`` runs before serving)
    either returns specs or raises an error that the CLI turns into one line and exit 2."""
    outcomes = []

    @settings(FUZZ, max_examples=400)
    @given(st.one_of(placement_docs.map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
                     st.text(max_size=80)))
    def run(text):
        with tempfile.TemporaryDirectory() as d:
            _write(d, "p.yaml", text)
            try:
                load_placements(d)
                outcomes.append("ok")
            except (ValueError, OSError, KeyError) as exc:
                assert "\n" not in str(exc).strip() and str(exc).strip(), repr(exc)
                outcomes.append("refused")

    run()
    assert outcomes.count("refused") > 300


def test_controller_process_refuses_a_broken_placement_file(tmp_path):
    """The real ``expertplane controller`` process: exit 2, one line, no traceback."""
    for i, text in enumerate(["name: ok\nmodel: {num_layers: -1}\n", "- 1\n- 2\n"]):
        d = tmp_path / f"pl{i}"
        d.mkdir()
        (d / "p.yaml").write_text(text)
        proc = subprocess.run([rs.EXPERTPLANE, "controller", "--listen", "127.0.0.1:0",
                               "--db", f"sqlite:///{tmp_path / 'db.sqlite'}",
                               "--placements", str(d)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (text, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert len([ln for ln in proc.stderr.splitlines() if "error" in ln]) == 1, proc.stderr
