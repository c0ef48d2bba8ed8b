"""Layer profiles: file format, shipped examples, errors naming the layer and field."""

import json

import pytest

from expertplane.planner.pipeline import (Profile, load_profile, partition, profile_from_layers,
                                          shipped_profiles)


def test_shipped_profiles_load():
    shipped = shipped_profiles()
    ds = load_profile(shipped["deepseek-v3-like"])
    kinds = [layer.kind for layer in ds.layers]
    assert kinds[0] == "embedding" and kinds[-1] == "head"
    assert kinds.count("dense") == 3 and kinds.count("moe") == 58
    head = ds.layers[-1]
    moe = next(layer for layer in ds.layers if layer.kind == "moe")
    assert head.times[0] > 2 * moe.times[0]                     # several layers' worth
    llama = load_profile(shipped["llama-like"])
    assert {layer.kind for layer in llama.layers[1:-1]} == {"dense"}
    assert llama.layers[-1].F > 4 * llama.layers[1].F


def test_ep_imbalance_scales_moe_times():
    prof = profile_from_layers([{"kind": "moe", "F": 1.0, "B": 2.0, "W": 1.0,
                                 "ep_imbalance": 1.5}])
    assert prof.times.tolist() == [[1.5, 3.0, 1.5]]


def test_yaml_and_json_files_and_repeat(tmp_path):
    doc = {"name": "tiny", "layers": [{"F": 1, "B": 2, "W": 1, "repeat": 3},
                                      {"kind": "head", "F": 4, "B": 8, "W": 4,
                                       "activation_bytes": "1e9"}]}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    (tmp_path / "p.yaml").write_text(
        "name: tiny\nlayers:\n  - {F: 1, B: 2, W: 1, repeat: 3}\n"
        "  - {kind: head, F: 4, B: 8, W: 4, activation_bytes: 1e9}\n")
    a, b = load_profile(tmp_path / "p.json"), load_profile(tmp_path / "p.yaml")
    assert a == b and len(a) == 4 and a.activation_bytes[-1] == 1e9
    assert isinstance(a, Profile)
    assert partition(a, 2, micro_batches=4).boundaries == (0, 3, 4)


@pytest.mark.parametrize("layers, field, fragment", [
    ([{"B": 1.0}], "layers[0].F", "required"),
    ([{"F": 1.0, "B": 1.0}, {"F": -1.0, "B": 1.0}], "layers[1].F", ">= 0"),
    ([{"F": 1.0, "B": 1.0, "W": 2.0}], "layers[0].W", "<= B"),
    ([{"F": 1.0, "B": "x"}], "layers[0].B", "finite number"),
    ([{"F": 1.0, "B": 1.0, "kind": "conv"}], "layers[0].kind", "one of"),
    ([{"F": 1.0, "B": 1.0, "kind": "moe", "ep_imbalance": 0.5}], "layers[0].ep_imbalance", ">= 1"),
    ([{"F": 1.0, "B": 1.0, "ep_imbalance": 1.2}], "layers[0].ep_imbalance", "kind moe"),
    ([{"F": 1.0, "B": 1.0, "speed": 2}], "layers[0].speed", "unknown field"),
    ([{"F": 1.0, "B": 1.0, "repeat": 0}], "layers[0].repeat", ">= 1"),
    ([{"F": 1.0, "B": 1.0, "param_bytes": float("nan")}], "layers[0].param_bytes", "finite"),
    ([3], "layers[0]", "mapping"),
    ([], "layers", "at least one"),
])
def test_errors_name_layer_and_field(layers, field, fragment):
    with pytest.raises(ValueError) as exc:
        profile_from_layers(layers)
    assert exc.value.field == field and fragment in str(exc.value)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_profile(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("layers: [unclosed")
    with pytest.raises(ValueError, match="^profile: .*not valid YAML"):
        load_profile(tmp_path / "bad.yaml")
    (tmp_path / "nolayers.json").write_text("{}")
    with pytest.raises(ValueError, match="'layers' list"):
        load_profile(tmp_path / "nolayers.json")
    (tmp_path / "p.txt").write_text("")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_profile(tmp_path / "p.txt")
