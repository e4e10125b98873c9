from conftest import run_cli


def test_matrix_pairs_json_and_table():
    r = run_cli("matrix", "--model", "gpt", "--pairs", "tp2pp2:tp1pp4,tp1pp1:tp2pp1", "--nproc", "0", "--json")
    assert r.code == 0, r.out + r.err
    j = r.json()
    assert j["ok"] and [p["pair"] for p in j["pairs"]] == ["tp2pp2->tp1pp4", "tp1pp1->tp2pp1"]
    assert all(p["result"] == "pass" and p["round_trip"] == "pass" and p["bytes"] > 0 for p in j["pairs"])
    t = run_cli("matrix", "--model", "gpt", "--pairs", "tp1pp2:tp2pp1", "--nproc", "0")
    assert t.code == 0 and "tp1pp2->tp2pp1" in t.out and "pass" in t.out


def test_matrix_bad_pairs_exit_2():
    r = run_cli("matrix", "--model", "gpt", "--pairs", "tp2pp2-tp1pp1")
    assert r.code == 2 and "SRC:DST" in r.err


def test_matrix_fails_when_a_pair_cannot_convert():
    r = run_cli("matrix", "--model", "gpt", "--pairs", "tp1pp1:tp3pp1", "--nproc", "0", "--json")
    assert r.code == 1
    (row,) = r.json()["pairs"]
    assert row["result"] == "FAIL" and "divisible" in row["detail"]


def test_matrix_moe_pair_changing_sub_optimizers_carries_optimizer_state():
    r = run_cli("matrix", "--model", "moe", "--pairs", "tp1pp1:tp1pp1ep2", "--nproc", "0", "--json")
    assert r.code == 0, r.out + r.err
    (row,) = r.json()["pairs"]
    assert row["result"] == "pass" and row["round_trip"] == "pass" and row["optimizer"] == "adam"
    assert "note" not in row
