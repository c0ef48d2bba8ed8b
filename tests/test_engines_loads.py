"""Engine load files for ``expertplane plan --loads`` and the engine plan formats it writes:
SGLang stat and per_pass dumps (written with torch.save as SGLang does), TensorRT-LLM statistic
directories (safetensors), --format sglang / trtllm; bad input gives one readable line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from expertplane.cli.main import main
from expertplane.engines import sglang_dumps, trtllm
from expertplane.engines.loads import parse_layers, read_loads
from expertplane.errors import FieldError

HIDDEN, DENSE, E, R = 6, 2, 8, 12      # 6 hidden layers, the first 2 dense; 8 experts, 12 slots
RNG = np.random.default_rng(7)


def _logical(buffer=3):
    c = RNG.integers(0, 50, size=(buffer, HIDDEN, E))
    c[:, :DENSE] = 0
    return c


def _stat_dump(path, counts):
    torch.save({"rank": 0, "logical_count": torch.tensor(counts, dtype=torch.int32),
                "average_utilization_rate_over_window": None}, path)


def _per_pass_dumps(directory, ranks=2, passes=3):
    """Each rank's physical-slot counts; returns the logical sum they stand for [HIDDEN, E]."""
    phy2log = np.tile(np.arange(R) % E, (HIDDEN, 1))
    phy2log[DENSE:, E:] = RNG.integers(0, E, size=(HIDDEN - DENSE, R - E))
    want = np.zeros((HIDDEN, E))
    for rank in range(ranks):
        records = []
        for i in range(passes):
            c = RNG.integers(0, 9, size=(HIDDEN, R))
            c[:DENSE] = 0
            np.add.at(want, (np.arange(HIDDEN)[:, None], phy2log), c)
            records.append({"forward_pass_id": i, "rank": rank, "gatherer_key": "primary",
                            "global_physical_count": torch.tensor(c, dtype=torch.int32)})
        torch.save({"records": records,
                    "last_physical_to_logical_map": torch.tensor(phy2log)},
                   directory / f"expert_distribution_recorder_17000000{rank}.5_{rank}.pt")
    return want


def test_stat_dump_and_directories(tmp_path):
    counts = _logical()
    _stat_dump(tmp_path / "expert_distribution_recorder_1700000000.1.pt", counts)
    got = read_loads(tmp_path / "expert_distribution_recorder_1700000000.1.pt")
    assert got.source == "sglang" and got.num_hidden_layers == HIDDEN
    assert got.layers == tuple(range(DENSE, HIDDEN))
    assert np.array_equal(got.loads, counts.sum(axis=0)[DENSE:])
    pp = tmp_path / "pp"
    pp.mkdir()
    want = _per_pass_dumps(pp)
    got = read_loads(pp)
    assert np.array_equal(got.loads, want[DENSE:]) and got.layers == tuple(range(DENSE, HIDDEN))
    assert read_loads(pp, (3, 4)).layers == (3, 4)


def test_trtllm_statistics(tmp_path):
    (tmp_path / "meta_info.json").write_text(json.dumps({"num_experts": E,
                                                         "num_experts_per_token": 2}))
    want = {}
    for rank in range(2):
        records = {}
        for it in (10, 11):
            for layer in (3, 5):
                c = torch.bincount(torch.randint(0, E, (40,)), minlength=E)
                records[f"{it}_{layer}"] = c
                want[layer] = want.get(layer, 0) + c.numpy()
        save_file(records, str(tmp_path / f"rank{rank}.safetensors"))
    save_file({"junk": torch.zeros(3)}, str(tmp_path / "rank0_raw.safetensors"))  # skipped
    got = read_loads(tmp_path)
    assert got.source == "trtllm" and got.layers == (3, 5)
    assert np.array_equal(got.loads, np.stack([want[3], want[5]]))


def _plan(tmp_path, loads, *extra, name="out"):
    out = tmp_path / name
    rc = main(["plan", "--loads", str(loads), "--replicas", str(R), "--groups", "1",
               "--nodes", "1", "--gpus", "4", "-o", str(out), *extra])
    return rc, out


def test_cli_formats(tmp_path):
    dump = tmp_path / "expert_distribution_recorder_1700000000.1.pt"
    _stat_dump(dump, _logical())
    rc, out = _plan(tmp_path, dump, "--format", "sglang", name="sglang.json")
    assert rc == 0
    rows = np.asarray(json.loads(out.read_text())["physical_to_logical_map"])
    assert rows.shape == (HIDDEN, R)                  # one row per hidden layer, dense included
    assert all(set(row) == set(range(E)) for row in rows)
    rc, out = _plan(tmp_path, dump, "--format", "json")
    doc = json.loads(out.read_text())
    assert doc["moe_layers"] == list(range(DENSE, HIDDEN)) and doc["num_hidden_layers"] == HIDDEN
    assert np.array_equal(rows[DENSE:], doc["phy2log"])
    rc, out = _plan(tmp_path, dump, "--format", "trtllm")
    cfg = yaml.safe_load(out.read_text())
    assert cfg["num_slots"] == R and cfg["layer_updates_per_iter"] == 0
    assert sorted(cfg["initial_global_assignments"]) == list(range(DENSE, HIDDEN))
    assert cfg["initial_global_assignments"][DENSE] == doc["phy2log"][0]
    # a plain [L, E] file with --hidden-layers: the MoE layers are the last L
    np.save(tmp_path / "w.npy", _logical(1)[0, DENSE:])
    rc, out = _plan(tmp_path, tmp_path / "w.npy", "--format", "sglang", "--hidden-layers", "6")
    assert rc == 0 and len(json.loads(out.read_text())["physical_to_logical_map"]) == HIDDEN
    # the previous plan may be SGLang's own hidden-layer map
    rc, out2 = _plan(tmp_path, dump, "--previous", str(tmp_path / "sglang.json"), "--format", "json")
    assert rc == 0 and json.loads(out2.read_text())["migration"]["slots_moved"] == 0


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "cannot read"),
    (lambda p: torch.save({"logical_count": torch.rand(2, 3)}, p), "integer counts"),
    (lambda p: torch.save({"logical_count": torch.zeros(2, 3, dtype=torch.int32)}, p),
     "every layer's count is zero"),
    (lambda p: torch.save({"records": [{"rank": 0}],
                           "last_physical_to_logical_map": torch.zeros(2, 3, dtype=torch.long)}, p),
     "global_physical_count: missing"),
    (lambda p: torch.save({"records": [{"global_physical_count": torch.ones(3, 3, dtype=torch.int32)}],
                           "last_physical_to_logical_map": torch.zeros(2, 3, dtype=torch.long)}, p),
     "must have shape [2, 3]"),
    (lambda p: torch.save({"records": []}, p), "last_physical_to_logical_map: missing"),
    (lambda p: torch.save({"other": 1}, p), "neither logical_count"),
])
def test_bad_dumps_are_one_line(tmp_path, capsys, make, message):
    path = tmp_path / "expert_distribution_recorder_1700000000.1.pt"
    make(path)
    rc, _ = _plan(tmp_path, path)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err, err


def test_bad_trtllm_and_layer_options(tmp_path, capsys):
    (tmp_path / "meta_info.json").write_text("{}")
    with pytest.raises(FieldError, match="num_experts"):
        trtllm.statistic_loads(tmp_path)
    (tmp_path / "meta_info.json").write_text(json.dumps({"num_experts": E}))
    with pytest.raises(FieldError, match="no rank"):
        trtllm.statistic_loads(tmp_path)
    (tmp_path / "rank0.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(FieldError, match="cannot read"):
        trtllm.statistic_loads(tmp_path)
    with pytest.raises(FieldError, match="--moe-layers"):
        parse_layers("3-x")
    assert parse_layers("1,3-5") == (1, 3, 4, 5)
    with pytest.raises(FieldError, match="no SGLang dump"):
        sglang_dumps.directory_loads(tmp_path / "nothing")
    np.save(tmp_path / "w.npy", np.ones((4, E)))
    rc, _ = _plan(tmp_path, tmp_path / "w.npy", "--format", "trtllm")
    assert rc == 2 and "--moe-layers" in capsys.readouterr().err
    rc, _ = _plan(tmp_path, tmp_path / "w.npy", "--hidden-layers", "3")
    assert rc == 2 and "fewer than the 4 load rows" in capsys.readouterr().err
