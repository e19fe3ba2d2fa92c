"""The <spm:…> tag parser and the name:weight list (pure functions)."""

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spm.tags import (
    TagError,
    check_name,
    format_tag,
    format_weight_list,
    name_problem,
    parse_tags,
    parse_weight_list,
    strip_tags,
    tag_weights,
)

# what the WebUI itself matches (modules/extra_networks.py, A1111 1.10)
WEBUI_RE = re.compile(r"<(\w+):([^>]+)>")

segment = st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp"), blacklist_characters="/\\:<>,."),
                  min_size=1, max_size=12).filter(lambda s: s.strip() == s and s.strip())
names = st.lists(segment, min_size=1, max_size=3).map("/".join)
weights = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)


def test_basic_forms():
    tags, problems = parse_tags("a cat <spm:nudity> and <spm:styles/van_gogh:0.8>")
    assert problems == []
    assert [(t.name, t.weight) for t in tags] == [("nudity", None), ("styles/van_gogh", 0.8)]
    w, _ = tag_weights("x <spm:nudity> <spm:cat:0.5> <spm:cat:0.25>", default=0.7)
    assert w == {"nudity": 0.7, "cat": 0.25}


@pytest.mark.parametrize("text, needle", [
    ("<spm:>", "empty"),
    ("<spm: :1>", "empty"),
    ("<spm:a:b:c>", "too many"),
    ("<spm:x:abc>", "not a number"),
    ("<spm:x:nan>", "finite"),
    ("<spm:x:inf>", "finite"),
    ("<spm:../../x>", ".."),
    ("<spm:a/../b>", ".."),
    ("<spm:/etc/passwd>", "absolute"),
    ("<spm:C:/x>", "not a number"),
    ("<spm:a\\b>", "'/'"),
    ("<spm:a//b>", "empty path segment"),
])
def test_malformed_tags_are_reported(text, needle):
    tags, problems = parse_tags(f"a photo {text} of a cat")
    assert tags == []
    assert len(problems) == 1 and needle in problems[0].message and text in problems[0].message


def test_unicode_names():
    tags, problems = parse_tags("<spm:ゴッホ:0.5> <spm:Ünïcødé/猫>")
    assert problems == []
    assert [t.name for t in tags] == ["ゴッホ", "Ünïcødé/猫"]


def test_strip_tags_removes_all_forms():
    assert strip_tags("a <spm:x:1> b <spm:> c <spm:a:b:c>") == "a  b  c "
    assert strip_tags("<lora:x:1> keep") == "<lora:x:1> keep"


@given(names, weights)
def test_format_parse_roundtrip(name, w):
    text = format_tag(name, w)
    tags, problems = parse_tags("prefix " + text + " suffix")
    assert problems == []
    assert tags[0].name == name
    assert math.isclose(tags[0].weight, w, rel_tol=1e-3, abs_tol=1e-9)
    # the WebUI's own regex sees the same tag, so it strips it from the text-encoder input
    m = WEBUI_RE.search(text)
    assert m and m.group(1) == "spm" and m.group(2).split(":")[0] == name


@given(st.text(max_size=40))
def test_parser_never_crashes_and_strip_leaves_no_tag(text):
    tags, problems = parse_tags(text)
    assert len(tags) + len(problems) == len(re.findall(r"<spm:[^>]*>", text))
    assert "<spm:" not in strip_tags(text) or not re.search(r"<spm:[^>]*>", strip_tags(text))


@given(st.dictionaries(names, weights, max_size=4))
def test_weight_list_roundtrip(d):
    parsed, problems = parse_weight_list(format_weight_list(d))
    assert problems == []
    assert list(parsed) == list(d)
    for k in d:
        assert math.isclose(parsed[k], d[k], rel_tol=1e-3, abs_tol=1e-9)


def test_weight_list_problems_and_defaults():
    parsed, problems = parse_weight_list("a:1, b, ../x:2, c:zz\nd:0.5", default=0.3)
    assert parsed == {"a": 1.0, "b": 0.3, "d": 0.5}
    assert len(problems) == 2 and "'..'" in problems[0] and "not a number" in problems[1]


def test_check_name():
    assert check_name("  a/b ") == "a/b"
    with pytest.raises(TagError, match="cannot leave"):
        check_name("..")
    assert name_problem("a,b") is not None
    assert name_problem("x" * 300) is not None
