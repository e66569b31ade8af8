"""Reference-format limits files (envoyproxy/ratelimit): what loads, and every error pinned."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratelimit import reference
from ratelimit.limits import Node
from sidegate.errors import ConfigError

GOOD = """\
domain: messaging
descriptors:
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5
          name: marketing_per_number
        shadow_mode: true
  - key: to_number
    rate_limit:
      unit: DAY
      requests_per_unit: 100
      replaces:
        - name: marketing_per_number
  - key: code
    value: 200
    rate_limit: {unit: week, requests_per_unit: 7}
  - key: ldap
    rate_limit:
      unlimited: true
  - key: prefix
    value: abc*
    detailed_metric: true
    rate_limit: {unit: year, requests_per_unit: 4294967295}
  - key: placeholder
"""


def test_a_file_in_the_reference_format_loads() -> None:
    domain, root = reference.parse(GOOD, "m.yaml")
    assert domain == "messaging"
    nested = root.children[("message_type", "marketing")].children[("to_number", None)]
    assert nested.rule is not None
    assert (nested.rule.limit, nested.rule.window_ms, nested.rule.shadow) == (5, 86_400_000, True)
    assert nested.rule.name == "marketing_per_number"
    assert nested.rule.policy == "marketing_per_number"
    top = root.children[("to_number", None)].rule
    assert top is not None
    assert top.replaces == frozenset({"marketing_per_number"})
    assert top.policy == "messaging.to_number"
    code = root.children[("code", "200")].rule  # a bare number is read as text, as the reference does
    assert code is not None
    assert code.window_ms == 7 * 86_400_000
    ldap = root.children[("ldap", None)].rule
    assert ldap is not None
    assert ldap.unlimited
    assert [(key, pattern.pattern) for key, pattern, _node in root.wildcards] == [("prefix", "abc.*")]
    wildcard = root.children[("prefix", "abc*")].rule
    assert wildcard is not None
    assert wildcard.detailed_metric
    assert wildcard.limit == 4_294_967_295
    assert root.children[("placeholder", None)] == Node(path="messaging.placeholder", segment="placeholder")


def test_global_shadow_mode_and_store_error_policy_apply_to_reference_rules() -> None:
    _domain, root = reference.parse(GOOD, "m.yaml", on_store_error="local", shadow=True)
    rule = root.children[("to_number", None)].rule
    assert rule is not None
    assert (rule.shadow, rule.on_store_error) == (True, "local")


BAD = [
    ("descriptors: []\n", "{f}:1: domain: required: a non-empty string"),
    ("domain: sidegate\n", "{f}:1: domain: 'sidegate' is reserved for gateway.yaml's plans and API limits"),
    ("domain: d\nlimits: []\n", "{f}:2: limits: unknown key"),
    ("domain: d\ndescriptors: {key: a}\n", "{f}:2: descriptors: must be a list"),
    ("domain: d\ndescriptors:\n  - value: x\n", "{f}:3: descriptors[0].key: required: a non-empty string"),
    ("domain: d\ndescriptors:\n  - key: a\n    valeu: x\n", "{f}:4: descriptors[0].valeu: unknown key"),
    (
        "domain: d\ndescriptors:\n  - key: a\n  - key: a\n",
        "{f}:4: descriptors[1].key: duplicate descriptor 'd.a' on this level",
    ),
    (
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
        "{f}:4: descriptors[0].rate_limit.unit: unknown unit 'fortnight' "
        "(known: second, minute, hour, day, week, month, year)",
    ),
    (
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {requests_per_unit: 1}\n",
        "{f}:4: descriptors[0].rate_limit.unit: unknown unit None "
        "(known: second, minute, hour, day, week, month, year)",
    ),
    (
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unlimited: true\n      unit: second\n",
        "{f}:6: descriptors[0].rate_limit.unit: an unlimited rate_limit takes no unit",
    ),
    (
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: -1}\n",
        "{f}:4: descriptors[0].rate_limit.requests_per_unit: must be a whole number from 0 to 4294967295",
    ),
    (
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      requests_per_unit: 1\n"
        "      name: n\n      replaces: [{name: n}]\n",
        "{f}:8: descriptors[0].rate_limit.replaces[0]: a rate_limit cannot replace itself ('n')",
    ),
    (
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      requests_per_unit: 1\n"
        "      replaces: [{}]\n",
        "{f}:7: descriptors[0].rate_limit.replaces[0]: needs a non-empty name",
    ),
    (
        "domain: d\ndescriptors:\n  - key: a\n    value: yes\n",
        "{f}:4: descriptors[0].value: must be a string (quote true/false/yes/no)",
    ),
    (
        "domain: d\ndescriptors:\n  - key: a\n    shadow_mode: sometimes\n",
        "{f}:4: descriptors[0].shadow_mode: must be true or false",
    ),
    (
        "domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: b\n        rate_limit: []\n",
        "{f}:6: descriptors[0].descriptors[0].rate_limit: must be a mapping",
    ),
    (
        "domain: d\ndescriptors:\n  - key: a\n  key: b\n",
        "{f}:4: not valid YAML: expected <block end>, but found '?' (while parsing a block collection at line 3)",
    ),
    ("- domain: d\n", "{f}:1: top level must be a mapping"),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[expected.split(": ", 2)[1] for _, expected in BAD])
def test_bad_reference_files_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        reference.load([path])
    assert str(info.value) == expected.format(f=path)


def test_every_problem_of_a_file_is_reported_in_line_order(tmp_path: Path) -> None:
    path = tmp_path / "limits.yaml"
    path.write_text("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: eon}\n  - {}\n  - key: c\n    x: 1\n")
    with pytest.raises(ConfigError) as info:
        reference.load([path])
    assert [line.split(": ", 2)[:2] for line in info.value.errors] == [
        [f"{path}:4", "descriptors[0].rate_limit.unit"],
        [f"{path}:5", "descriptors[1].key"],
        [f"{path}:7", "descriptors[2].x"],
    ]


def test_two_files_with_one_domain_and_a_missing_file(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("domain: d\ndescriptors: []\n")
    second.write_text("# the same domain again\ndomain: d\n")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        reference.load([first, second, missing])
    assert info.value.errors == (
        f"{second}:2: domain: duplicate domain 'd': an earlier file has it",
        f"{missing}: cannot read: No such file or directory",
    )


def test_several_files_several_domains(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(f"domain: {name}\ndescriptors:\n  - key: k\n")
    domains = reference.load([tmp_path / "a.yaml", tmp_path / "b.yaml"])
    assert sorted(domains) == ["a", "b"]
