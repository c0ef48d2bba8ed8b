"""``expertplane plan`` round trips: every load format in, JSON/YAML/SGLang out."""

import json
import pathlib
import sys

import numpy as np
import pytest
import torch
import yaml

from expertplane.cli.main import main
from expertplane.planner import rebalance_experts
from expertplane.planner.io import load_loads, load_phy2log
from expertplane.planner.transfers import plan_transfers

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from shared_data import eplb_json  # noqa: E402

README = eplb_json("readme_example.json")
ARGS = ["--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8"]


def _write_loads(tmp_path, kind):
    w = np.array(README["weight"], dtype=np.float64)
    path = tmp_path / f"loads.{kind}"
    if kind == "npy":
        np.save(path, w)
    elif kind == "pt":
        torch.save(torch.tensor(w), path)
    elif kind == "json":
        path.write_text(json.dumps(w.tolist()))
    else:
        np.savetxt(path, w, delimiter=",")
    return path


@pytest.mark.parametrize("kind", ["npy", "pt", "json", "csv"])
def test_plan_json_round_trip(tmp_path, kind, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--loads", str(_write_loads(tmp_path, kind)), *ARGS, "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["phy2log"] == README["phy2log"]
    assert doc["policy"] == "hierarchical" and doc["algorithm"] == "deepseek"
    assert len(doc["balance"]["per_layer"]) == 2 and doc["migration"] is None
    assert np.array(doc["log2phy"]).shape[:2] == (2, 12) and len(doc["logcnt"][0]) == 12
    assert "balance" in capsys.readouterr().err


def test_yaml_output_reads_back_as_previous_plan(tmp_path):
    loads = _write_loads(tmp_path, "npy")
    out = tmp_path / "plan.yaml"
    assert main(["plan", "--loads", str(loads), *ARGS, "-o", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["phy2log"] == README["phy2log"]
    assert load_phy2log(out).tolist() == README["phy2log"]


def test_sglang_dump_in_and_init_expert_location_out(tmp_path):
    counts = np.array(README["weight"], dtype=np.int64)
    windows = np.stack([counts // 2, counts - counts // 2])  # [window, layers, experts]
    dump = tmp_path / "expert_distribution.pt"
    torch.save({"logical_count": torch.from_numpy(windows), "rank": 0}, dump)
    assert np.array_equal(load_loads(dump), counts)
    out = tmp_path / "init_expert_location.json"
    assert main(["plan", "--loads", str(dump), *ARGS, "--format", "sglang", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc) == ["physical_to_logical_map"]
    assert doc["physical_to_logical_map"] == README["phy2log"]
    json_dump = tmp_path / "dump.json"
    json_dump.write_text(json.dumps({"logical_count": windows.tolist()}))
    assert np.array_equal(load_loads(json_dump), counts)
    assert load_phy2log(out).tolist() == README["phy2log"]


def test_stdout_when_no_output(tmp_path, capsys):
    assert main(["plan", "--loads", str(_write_loads(tmp_path, "json")), *ARGS]) == 0
    assert json.loads(capsys.readouterr().out)["phy2log"] == README["phy2log"]


@pytest.mark.parametrize("extra, message", [
    (["--replicas", "17"], "num_replicas: must be a multiple of num_gpus"),
    (["--remote-cost", "1"], "--remote-cost: applies only to --algorithm topology"),
])
def test_user_errors_are_one_line(tmp_path, capsys, extra, message):
    assert main(["plan", "--loads", str(_write_loads(tmp_path, "npy")), *ARGS, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_files(tmp_path, capsys):
    assert main(["plan", "--loads", str(tmp_path / "missing.npy"), *ARGS]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "loads.txt"
    bad.write_text("1,2")
    assert main(["plan", "--loads", str(bad), *ARGS]) == 2
    assert "unsupported file type" in capsys.readouterr().err
    mapping = tmp_path / "loads.json"
    mapping.write_text(json.dumps({"counts": [[1]]}))
    assert main(["plan", "--loads", str(mapping), *ARGS]) == 2
    assert "loads:" in capsys.readouterr().err


def test_cli_matches_api(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.zipf(1.4, size=(3, 32)).astype(np.float64)
    np.save(tmp_path / "w.npy", w)
    out = tmp_path / "p.json"
    assert main(["plan", "--loads", str(tmp_path / "w.npy"), "--replicas", "40", "--groups", "8",
                 "--nodes", "3", "--gpus", "8", "-o", str(out)]) == 2  # 8 GPUs not a multiple of 3
    assert main(["plan", "--loads", str(tmp_path / "w.npy"), "--replicas", "48", "--groups", "8",
                 "--nodes", "3", "--gpus", "12", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["policy"] == "global"
    assert doc["phy2log"] == rebalance_experts(w, 48, 8, 3, 12)[0].tolist()


def test_previous_plan_reports_migration(tmp_path):
    loads = _write_loads(tmp_path, "npy")
    first = tmp_path / "first.json"
    assert main(["plan", "--loads", str(loads), *ARGS, "--format", "sglang", "-o", str(first)]) == 0
    drifted = np.array(README["weight"], dtype=np.float64)
    drifted[:, 0] *= 3
    np.save(tmp_path / "drift.npy", drifted)
    out = tmp_path / "second.yaml"
    assert main(["plan", "--loads", str(tmp_path / "drift.npy"), *ARGS, "--previous", str(first),
                 "--expert-bytes", "100", "-o", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    moved = (np.array(doc["phy2log"]) != np.array(README["phy2log"])).sum()
    received = plan_transfers(README["phy2log"], doc["phy2log"], 8, 4).remote_fills
    assert doc["migration"]["slots_moved"] == moved
    assert doc["migration"]["bytes_moved"] == 100 * received
    assert sum(doc["migration"]["per_layer"]) == moved


def test_sizing_prints_curve_and_recommendation(tmp_path, capsys):
    loads = _write_loads(tmp_path, "npy")
    assert main(["plan", "--loads", str(loads), "--groups", "4", "--nodes", "2", "--gpus", "4",
                 "--sizing", "--target-balance", "1.5", "--max-redundant", "8"]) == 0
    out = capsys.readouterr().out
    assert "redundancy sizing" in out and "recommended:" in out


def test_topology_from_cli(tmp_path):
    loads = _write_loads(tmp_path, "npy")
    out = tmp_path / "topo.json"
    assert main(["plan", "--loads", str(loads), *ARGS, "--algorithm", "topology",
                 "--remote-cost", "0.5", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["algorithm"] == "topology" and np.array(doc["phy2log"]).shape == (2, 16)
