"""XML ⇄ JSON, pure: the documented mapping case by case, round trips as properties, and a parser
that refuses DTDs, entities and anything malformed with an ``XmlError`` — never another exception."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.xml import JSON_NS, XSI_NS, XmlError, decode_name, encode_name, from_xml, infer, to_xml

# -- the mapping, case by case (the module docstring's table) --------------------------------


@pytest.mark.parametrize(
    ("xml", "doc"),
    [
        (b"<r><a>text</a></r>", {"a": "text"}),
        (
            b"<r><a>12</a><b>1.5</b><c>true</c><d>01234</d><e>1e3</e></r>",
            {"a": 12, "b": 1.5, "c": True, "d": "01234", "e": 1000.0},
        ),
        (b"<r><a></a><b/></r>", {"a": "", "b": ""}),
        (f'<r xmlns:xsi="{XSI_NS}"><a xsi:nil="true"/></r>'.encode(), {"a": None}),
        (b'<r><a x="1">text</a></r>', {"a": {"@x": "1", "#text": "text"}}),
        (b"<r><a><b>1</b><c>2</c></a></r>", {"a": {"b": 1, "c": 2}}),
        (b"<r><a><b>1</b><b>2</b></a></r>", {"a": {"b": [1, 2]}}),
        (b'<r><a xmlns:p="urn:p"><p:b/></a></r>', {"a": {"@xmlns:p": "urn:p", "p:b": ""}}),
        (b'<r xmlns="urn:d"><a/></r>', {"@xmlns": "urn:d", "a": ""}),
        (b"<r><a>t<b/>u</a></r>", {"a": {"#text": "tu", "b": ""}}),
        (b"<r>\n  <a>1</a>\n  <a>2</a>\n</r>", {"a": [1, 2]}),  # indentation is not text
        (b"<r><a>  spaced  </a></r>", {"a": "  spaced  "}),  # a leaf's text is kept exactly
        (b"<r><![CDATA[<not a tag>]]></r>", "<not a tag>"),
        (b"<r>&lt;&amp;&#65;&#x42;</r>", "<&AB"),
        (b"<r><!-- a comment --><a>1</a><?pi ignored?></r>", {"a": 1}),
        (b"<r>plain</r>", "plain"),
        (f'<r xmlns:json="{JSON_NS}" json:type="array"><item>1</item><item>b</item></r>'.encode(), [1, "b"]),
        (
            f'<r xmlns:j="{JSON_NS}"><a j:array="true">1</a><e j:type="array"/><o j:type="object"/></r>'.encode(),
            {"a": [1], "e": [], "o": {}},
        ),
        (f'<r xmlns:j="{JSON_NS}"><a j:type="string">12</a><b j:type="number">7</b></r>'.encode(), {"a": "12", "b": 7}),
        (b"<r><_x0032_fa>1</_x0032_fa><a_x0020_b>2</a_x0020_b></r>", {"2fa": 1, "a b": 2}),
        ("<r><名前>ü</名前></r>".encode(), {"名前": "ü"}),
        ('<?xml version="1.0" encoding="ISO-8859-1"?><r>\xe9</r>'.encode("latin-1"), "é"),
    ],
)
def test_xml_reads_as_documented(xml: bytes, doc: Any) -> None:
    assert from_xml(xml) == doc


def test_type_inference_can_be_turned_off() -> None:
    assert from_xml(b"<r><a>12</a><b>true</b></r>", infer_types=False) == {"a": "12", "b": "true"}
    xml = to_xml({"a": 12, "b": True, "c": "x"}, infer_types=False)
    assert b'<a json:type="number">12</a><b json:type="boolean">true</b><c>x</c>' in xml
    assert from_xml(xml, infer_types=False) == {"a": 12, "b": True, "c": "x"}


def test_json_writes_plain_xml_where_it_can() -> None:
    doc = {"id": 7, "customer": "ada", "items": [{"sku": "a"}, {"sku": "b"}]}
    assert to_xml(doc, root="order") == (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b"<order><id>7</id><customer>ada</customer><items><sku>a</sku></items><items><sku>b</sku></items></order>"
    )


def test_json_writes_hints_only_where_plain_xml_would_read_back_differently() -> None:
    xml = to_xml({"zip": "01234", "code": "42", "one": [1], "none": [], "empty": {}, "n": None}).decode()
    assert f'xmlns:json="{JSON_NS}"' in xml
    assert f'xmlns:xsi="{XSI_NS}"' in xml
    assert "<zip>01234</zip>" in xml  # "01234" is no JSON number: no hint needed
    assert '<code json:type="string">42</code>' in xml
    assert '<one json:array="true">1</one>' in xml
    assert '<none json:type="array"/>' in xml
    assert '<empty json:type="object"/>' in xml
    assert '<n xsi:nil="true"/>' in xml


def test_arrays_of_arrays_and_whole_body_arrays_use_item_elements() -> None:
    xml = to_xml([[1, 2], []], root="list", item="entry")
    assert xml.endswith(
        b'<list xmlns:json="urn:sidegate:json" json:type="array"><entry json:type="array"><entry>1</entry>'
        b'<entry>2</entry></entry><entry json:type="array"/></list>'
    )
    assert from_xml(xml) == [[1, 2], []]


def test_escaping_keeps_text_and_attributes_exact() -> None:
    doc = {"t": "a<b>&c\r\n]]>", "@a": 'q"\t\n\r<&'}
    assert from_xml(to_xml(doc)) == doc


def test_a_prefix_is_kept_only_where_declared() -> None:
    xml = to_xml({"@xmlns:p": "urn:p", "p:a": 1, "q:b": 2}).decode()
    assert "<p:a>1</p:a>" in xml
    assert "<q_x003A_b>2</q_x003A_b>" in xml  # q is not declared: the colon is escaped


@pytest.mark.parametrize("key", ["a", "2fa", "a b", "_x0041_", "_", "é", "x:y", "\U0001f600", "-x", ".x", "a\u0000b"])
def test_names_escape_and_unescape(key: str) -> None:
    name = encode_name(key)
    assert decode_name(name) == key
    assert from_xml(f"<r><{name}>1</{name}></r>".encode()) == {key: 1}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("-12", -12),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        ("true", True),
        ("false", False),
        ("01", "01"),
        (" 1", " 1"),
        ("1.", "1."),
        ("+1", "+1"),
        ("NaN", "NaN"),
        ("null", "null"),
        ("1e999", "1e999"),
        ("", ""),
    ],
)
def test_only_exact_json_numbers_and_booleans_are_inferred(text: str, value: Any) -> None:
    assert infer(text) == value
    assert type(infer(text)) is type(value)


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"": 1}, "an empty key"),
        ({"a": "\u0001"}, "XML 1.0 cannot carry"),
        ({"@a": "\ufffe"}, "XML 1.0 cannot carry"),
    ],
)
def test_what_xml_cannot_carry_is_an_error(doc: Any, problem: str) -> None:
    with pytest.raises(XmlError, match=problem):
        to_xml(doc)


def test_nesting_is_bounded_both_ways() -> None:
    deep: Any = "x"
    for _ in range(200):
        deep = {"a": deep}
    with pytest.raises(XmlError, match="nested deeper"):
        to_xml(deep)
    with pytest.raises(XmlError, match="nested deeper"):
        from_xml(b"<a>" * 200 + b"</a>" * 200)


# -- refused input ----------------------------------------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<lolz>&lol3;</lolz>"""


@pytest.mark.parametrize(
    ("xml", "problem"),
    [
        (BILLION_LAUGHS, "DTDs are not allowed"),
        (b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>', "DTDs are not allowed"),
        (b'<!DOCTYPE r [<!ENTITY % p SYSTEM "http://127.0.0.1:1/x">%p;]><r/>', "DTDs are not allowed"),
        (b'<!DOCTYPE r SYSTEM "http://127.0.0.1:1/x.dtd"><r/>', "DTDs are not allowed"),
        (b"<!DOCTYPE r><r/>", "DTDs are not allowed"),
        (b"<r>&x;</r>", "undefined entity"),
        (b"<r><a></r>", "mismatched tag"),
        (b"<r/><s/>", "junk after document element"),
        (b"", "no element found"),
        (b"just text", "syntax error"),
        (b"<p:r/>", "unbound prefix"),
        (b'<r a="1" a="2"/>', "duplicate attribute"),
        (b"\xff\xfe\x00", "not well-formed"),
        (f'<r xmlns:j="{JSON_NS}" j:type="date">1</r>'.encode(), "unknown hint"),
        (f'<r xmlns:j="{JSON_NS}" j:type="number">x</r>'.encode(), "json:type=number"),
        (f'<r xmlns:j="{JSON_NS}" j:type="boolean">1</r>'.encode(), "json:type=boolean"),
        (f'<r xmlns:j="{JSON_NS}" j:type="array" a="1"/>'.encode(), "json:type=array"),
        (f'<r xmlns:j="{JSON_NS}" a="1" j:type="string"/>'.encode(), "cannot be json:type=string"),
        (f'<r xmlns:x="{XSI_NS}" x:nil="true">1</r>'.encode(), "xsi:nil but has content"),
    ],
)
def test_refused_xml_is_an_xml_error(xml: bytes, problem: str) -> None:
    with pytest.raises(XmlError, match=problem):
        from_xml(xml)


# -- properties ---------------------------------------------------------------------------------

# Characters XML 1.0 can carry (no other control characters, no surrogates, no U+FFFE/U+FFFF).
_xml_chars = st.characters(
    blacklist_categories=("Cs",),
    blacklist_characters="".join(chr(c) for c in range(32) if c not in (9, 10, 13)) + "\ufffe\uffff",
)
_text = st.text(_xml_chars, max_size=12)
_key = st.text(_xml_chars, min_size=1, max_size=8).filter(lambda k: not k.startswith("@") and k != "#text")
_attr = st.text(_xml_chars, min_size=1, max_size=8).filter(
    lambda k: k != "xmlns" and not k.startswith(("xmlns:", "xsi:nil", "@")) and k != "#text"
)
_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)


def _object(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """An object of the documented domain: ``@`` keys carry strings, ``#text`` is a string,
    non-empty, and trimmed when the object also has child elements."""

    def build(parts: tuple[dict[str, Any], dict[str, str], str | None]) -> dict[str, Any]:
        kids, attrs, text = parts
        doc: dict[str, Any] = {f"@{k}": v for k, v in attrs.items()}
        if text and (not kids or text == text.strip()):
            doc["#text"] = text
        doc.update(kids)
        return doc

    return st.tuples(
        st.dictionaries(_key, children, max_size=4),
        st.dictionaries(_attr, _text, max_size=2),
        st.none() | _text,
    ).map(build)


_json = st.recursive(_scalar, lambda children: st.lists(children, max_size=4) | _object(children), max_leaves=20)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(_json, st.booleans())
def test_json_round_trips_through_xml(doc: Any, infer_types: bool) -> None:
    xml = to_xml(doc, root="order", infer_types=infer_types)
    assert from_xml(xml, infer_types=infer_types) == doc


@given(_json)
def test_xml_round_trips_through_json(doc: Any) -> None:
    """XML that JSON wrote → JSON → XML gives the same XML (what the upstream sees is stable)."""
    xml = to_xml(doc)
    again = json.loads(json.dumps(from_xml(xml)))
    assert to_xml(again) == xml


@given(st.binary(max_size=200))
def test_random_bytes_are_read_or_refused_never_crash(body: bytes) -> None:
    with contextlib.suppress(XmlError):
        from_xml(body)


_tags = st.sampled_from(
    [
        "<r>",
        "</r>",
        "<a>",
        "</a>",
        "<a/>",
        "&amp;",
        "&x;",
        "<!DOCTYPE r>",
        "<![CDATA[",
        "]]>",
        'x="1"',
        "<",
        ">",
        "text",
        "<?xml version='1.0'?>",
        "<!--",
        "-->",
        "&#0;",
        "&#x10FFFF;",
    ]
)


@given(st.lists(_tags, max_size=12).map("".join))
def test_xml_like_garbage_is_read_or_refused_never_crash(body: str) -> None:
    with contextlib.suppress(XmlError):
        from_xml(body.encode())
