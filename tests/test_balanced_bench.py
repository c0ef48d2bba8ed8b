"""``expertplane bench planner`` runs end to end on a small case and writes its rows."""

import json

from expertplane.cli.main import main


def test_bench_planner_small_run(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = main(["bench", "planner", "--shapes", "hier-288/32", "--families", "zipf1.2",
               "--layers", "2", "--repeat", "1", "--json", str(out)])
    assert rc in (0, None)
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    row = rows[0]
    assert row["t_reference"] > 0 and row["t_balanced"] > 0
    assert row["bound"] <= row["balance_balanced"] <= row["balance_deepseek"]
    assert row["moved_aware"] <= row["moved_fresh"]
    assert "balanced" in capsys.readouterr().out
