"""The compiler's YAML writer: what it writes, YAML reads back as the same data."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from sidegate.compiler import yamltext

TRICKY = [
    *("yes", "No", "on", "OFF", "y", "n", "true", "null", "Null", "~", "<<", "="),  # YAML 1.1 words
    *("1", "-1", "+1", "1.5", "0x1f", "1_000", "2026-01-01", ".inf", ".nan"),  # numbers and dates
    *("", " ", ":", "a: b", "- x", "#c", "a #b", "*a", "&b", "!t", "%p", "@type", "{a}", "[b]", "a,b"),
    *("x\ny", "tab\t", "'q'", '"dq"', "\u00e9", "a b", "/p/a_b.c-d@e+f", "type.googleapis.com/envoy.X"),
]


@pytest.mark.parametrize("value", TRICKY)
def test_every_string_reads_back_as_itself(value: str) -> None:
    doc = {value: value, "list": [value]}
    assert yaml.safe_load(yamltext.dump(doc)) == doc


def test_nesting_numbers_and_empty_containers_read_back() -> None:
    doc: dict[str, Any] = {
        "a": [[1, 2], [], {}, [[3]], {"x": 1, "y": [{"z": None, "w": [True, False]}]}],
        "b": {},
        "floats": [1.5, 1e-05, 2.0, 0.25],
        "ints": [0, -3, 65536],
    }
    assert yaml.safe_load(yamltext.dump(doc)) == doc


def test_a_table_met_twice_is_written_once() -> None:
    table = {"name": "t", "virtual_hosts": [{"name": "v", "routes": [{"match": {"prefix": "/"}}]}]}
    doc = {"one": {"route_config": table}, "two": {"route_config": table}, "other": {"name": "t"}}
    text = yamltext.dump(doc, anchors=("virtual_hosts",))
    assert text.count("virtual_hosts") == 1
    assert yaml.safe_load(text) == doc
