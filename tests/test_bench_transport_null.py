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
