"""``bench.transport_null``'s whole-vocabulary scan on a toy world."""

import pytest

from bench import transport_null as tn

pytestmark = pytest.mark.usefixtures("one_thread")


def test_vocabulary_scan_splits_world_words_from_unrelated_ones():
    out = tn.toy_vocabulary(("toy",), objects=["circle", "heart"])
    r = out["toy"]
    assert r["world"] == "shapes" and r["words_scanned"] > 30000 and r["pairs"] == 2 * r["words_scanned"]
    # circle's and heart's trained paraphrase words open them; nothing else in the vocabulary does
    assert r["objects"]["circle"] == {"world_words": ["disc"], "other_words": []}
    assert r["objects"]["heart"] == {"world_words": ["valentine"], "other_words": []}
    assert r["other_word_pairs"] == 0


def test_transport_rules_compares_the_shipped_pooled_null_with_a_null_per_length():
    from bench import transport_rules as rules

    out = rules.measure_world("toy", n_para=12, n_lit=6, n_random=20)
    assert out["world"] == "shapes" and set(out["objects"]) == {"circle", "square", "triangle", "star", "cross", "heart",
                                                                "ring", "arrow"}
    names = {f"{k}:{n}" for k in ("pooled", "per_length") for n in rules.LENGTHS}
    for row in out["objects"].values():
        assert names <= set(row) and row["tokens"] == 1
        shipped = row["pooled:shipped"]
        # world 1: the shipped rule gives every paraphrase caption full strength and no other object's caption any
        assert shipped["paraphrase_full"] == shipped["paraphrase"] > 0
        assert shipped["nontarget_open"] == 0 and shipped["nontarget"] > 0
        # a null per length is never stricter than the pooled one (its thresholds are at most the pooled ones)
        assert row["per_length:shipped"]["paraphrase_open"] >= shipped["paraphrase_open"]
        assert row["per_length:shipped"]["nontarget_open"] >= shipped["nontarget_open"]
    tot = rules.summary({"toy": out})
    assert tot["pooled:shipped"]["nontarget_open"] == 0
    assert tot["pooled:shipped"]["paraphrase"] == sum(r["pooled:shipped"]["paraphrase"] for r in out["objects"].values())


def test_transport_rules_names_an_unknown_world(capsys):
    from bench import transport_rules as rules

    with pytest.raises(SystemExit) as e:
        rules.main(["--world", "nope"])
    assert e.value.code == 2 and "--world nope: not a shipped toy model" in capsys.readouterr().err
