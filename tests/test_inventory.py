"""The inventory loader: a good file loads, and every bad one names file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from der_sdk.errors import ConfigError, ConfigIssue, UnknownNameError
from der_sdk.inventory import Inventory, load_inventory, parse_inventory

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SITE_A = "6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f"
SITE_B = "7a2d3c4b-5e6f-4a1b-9c8d-1e2f3a4b5c6d"
ASSET_1 = "0b6c1e52-7f0e-4d8a-9a57-2c1f3e4d5a61"
ASSET_2 = "1c7d2f63-8a1f-4e9b-8b68-3d2a4f5e6b72"

GOOD = f"""\
sites:
  - site_id: {SITE_A}
    name: North Yard
    location: Depot Road
  - site_id: {SITE_B}
    name: Solar Ridge
assets:
  - asset_id: {ASSET_2}
    site_id: {SITE_A}
    name: BESS 2
    capacity_mwh: 4.0
    max_mw: 2.0
    min_mw: -2.0
    ramp_rate_mw_per_min: 1.0
    efficiency: 0.9
  - asset_id: {ASSET_1}
    site_id: {SITE_A}
    name: BESS 1
    asset_type: bess
    capacity_mwh: 2
    max_mw: 1
    min_mw: -1
    location: container 1
"""

TYPES = ["bess", "pv", "wind", "ev_charger"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "assets.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(text: str, marker: str, occurrence: int = 1) -> int:
    """1-based line of the ``occurrence``-th line containing ``marker``."""
    hits = [n for n, line in enumerate(text.splitlines(), 1) if marker in line]
    return hits[occurrence - 1]


def issue_for(path: Path, text: str, field: str | None) -> ConfigIssue:
    with pytest.raises(ConfigError) as caught:
        load_inventory(write(path, text), asset_types=TYPES)
    matching = [i for i in caught.value.issues if i.field == field]
    assert matching, f"no issue for {field!r} in:\n{caught.value}"
    return matching[0]


def assert_names(issue: ConfigIssue, line: int | None, field: str | None, *words: str) -> None:
    text = str(issue)
    assert "assets.yaml" in text
    if line is not None:
        assert f"assets.yaml:{line}:" in text
        assert issue.line == line
    if field is not None:
        assert field in text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"


# --------------------------------------------------------------------------- good files


def test_good_file_loads(tmp_path: Path) -> None:
    inventory = load_inventory(write(tmp_path, GOOD), asset_types=TYPES)
    assert isinstance(inventory, Inventory)
    assert inventory.path.endswith("assets.yaml")
    assert list(inventory.sites) == [SITE_A, SITE_B]
    assert list(inventory.assets) == [ASSET_2, ASSET_1]  # file order
    assert inventory.site(SITE_A).name == "North Yard"
    assert inventory.site(SITE_A).location == "Depot Road"
    one = inventory.asset(ASSET_1)
    assert (one.capacity_mwh, one.max_mw, one.min_mw) == (2.0, 1.0, -1.0)
    assert isinstance(one.max_mw, float)
    assert one.efficiency == 1.0 and one.ramp_rate_mw_per_min is None
    assert one.asset_type == "bess" and one.location == "container 1"
    two = inventory.asset(ASSET_2)
    assert (two.ramp_rate_mw_per_min, two.efficiency) == (1.0, 0.9)
    assert [a.asset_id for a in inventory.assets_for_site(SITE_A)] == [ASSET_1, ASSET_2]
    assert inventory.assets_for_site(SITE_B) == []


def test_ids_are_normalised_to_canonical_uuids(tmp_path: Path) -> None:
    text = GOOD.replace(f"asset_id: {ASSET_1}", f"asset_id: '{{{ASSET_1.upper()}}}'").replace(
        f"site_id: {SITE_B}", f"site_id: {SITE_B.replace('-', '').upper()}"
    )
    inventory = load_inventory(write(tmp_path, text), asset_types=TYPES)
    assert ASSET_1 in inventory.assets
    assert SITE_B in inventory.sites
    assert inventory.asset(ASSET_1.upper()).asset_id == ASSET_1


def test_unknown_lookups_list_what_exists(tmp_path: Path) -> None:
    inventory = load_inventory(write(tmp_path, GOOD), asset_types=TYPES)
    with pytest.raises(UnknownNameError, match=SITE_A):
        inventory.site("00000000-0000-4000-8000-000000000000")
    with pytest.raises(UnknownNameError, match=ASSET_1):
        inventory.asset("nope")


def test_example_inventory_loads_with_installed_asset_types() -> None:
    inventory = load_inventory(EXAMPLES / "assets.yaml")  # asset types from the plugins
    assert len(inventory.sites) == 2
    assert len(inventory.assets) == 5
    north = next(s for s in inventory.sites.values() if s.name == "North Yard")
    caps = sorted(a.capacity_mwh for a in inventory.assets_for_site(north.site_id))
    assert caps == [2.0, 4.0, 6.0]
    assert all(a.asset_type == "bess" for a in inventory.assets.values())


def test_parse_inventory_names_the_label() -> None:
    with pytest.raises(ConfigError, match=r"^inline:2: sites\[0\]\.name: missing"):
        parse_inventory(f"sites:\n  - site_id: {SITE_A}\n    location: x\nassets: []\n", "inline")


def test_all_issues_are_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("max_mw: 2.0", "max_mw: abc").replace("efficiency: 0.9", "efficiency: 2")
    with pytest.raises(ConfigError) as caught:
        load_inventory(write(tmp_path, text), asset_types=TYPES)
    fields = [i.field for i in caught.value.issues]
    assert fields == ["assets[0].max_mw", "assets[0].efficiency"]


# --------------------------------------------------------------------------- one test per error


def test_missing_site_id(tmp_path: Path) -> None:
    text = GOOD.replace(f"    site_id: {SITE_A}\n    name: BESS 1\n", "    name: BESS 1\n")
    issue = issue_for(tmp_path, text, "assets[1].site_id")
    assert_names(issue, line_of(text, f"asset_id: {ASSET_1}"), "assets[1].site_id", "missing")


def test_duplicate_asset_id_names_both_lines(tmp_path: Path) -> None:
    text = GOOD.replace(f"asset_id: {ASSET_1}", f"asset_id: {ASSET_2}")
    first, second = line_of(text, f"asset_id: {ASSET_2}", 1), line_of(text, ASSET_2, 2)
    issue = issue_for(tmp_path, text, "assets[1].asset_id")
    assert_names(issue, second, "assets[1].asset_id", "duplicate", f"line {first}", ASSET_2)


def test_duplicate_site_id_names_both_lines(tmp_path: Path) -> None:
    text = GOOD.replace(f"site_id: {SITE_B}", f"site_id: {SITE_A}")
    first, second = (
        line_of(text, f"- site_id: {SITE_A}", 1),
        line_of(text, f"- site_id: {SITE_A}", 2),
    )
    issue = issue_for(tmp_path, text, "sites[1].site_id")
    assert_names(issue, second, "sites[1].site_id", "duplicate", f"line {first}")


def test_min_mw_greater_than_max_mw(tmp_path: Path) -> None:
    text = GOOD.replace("min_mw: -2.0", "min_mw: 3.0")
    issue = issue_for(tmp_path, text, "assets[0].min_mw")
    assert_names(issue, line_of(text, "min_mw: 3.0"), "assets[0].min_mw", "greater than max_mw")


def test_unknown_site_lists_known_sites(tmp_path: Path) -> None:
    other = "99999999-9999-4999-8999-999999999999"
    text = GOOD.replace(
        f"site_id: {SITE_A}\n    name: BESS 1", f"site_id: {other}\n    name: BESS 1"
    )
    issue = issue_for(tmp_path, text, "assets[1].site_id")
    assert_names(issue, line_of(text, other), "assets[1].site_id", "unknown site", SITE_A, SITE_B)


@pytest.mark.parametrize("field", ["asset_id", "site_id"])
def test_bad_uuid(tmp_path: Path, field: str) -> None:
    good = ASSET_2 if field == "asset_id" else SITE_A
    text = GOOD.replace(f"{field}: {good}", f"{field}: bess-two", 1)
    expected = "assets[0].asset_id" if field == "asset_id" else "sites[0].site_id"
    issue = issue_for(tmp_path, text, expected)
    assert_names(issue, line_of(text, "bess-two"), expected, "not a UUID", "bess-two")


def test_asset_site_id_must_be_a_uuid(tmp_path: Path) -> None:
    text = GOOD.replace(f"site_id: {SITE_A}\n    name: BESS 2", "site_id: 12\n    name: BESS 2")
    issue = issue_for(tmp_path, text, "assets[0].site_id")
    assert_names(issue, line_of(text, "site_id: 12"), "assets[0].site_id", "expected str, got int")


def test_unknown_asset_type_lists_installed(tmp_path: Path) -> None:
    text = GOOD.replace("asset_type: bess", "asset_type: battery")
    issue = issue_for(tmp_path, text, "assets[1].asset_type")
    assert_names(
        issue, line_of(text, "asset_type: battery"), "assets[1].asset_type", "battery",
        "bess, ev_charger, pv, wind",
    )  # fmt: skip


def test_unknown_asset_type_defaults_to_the_installed_plugins(tmp_path: Path) -> None:
    text = GOOD.replace("asset_type: bess", "asset_type: battery")
    with pytest.raises(ConfigError, match=r"installed: bess, ev_charger, pv, wind"):
        load_inventory(write(tmp_path, text))


def test_wrong_type(tmp_path: Path) -> None:
    text = GOOD.replace("max_mw: 2.0", 'max_mw: "abc"')
    issue = issue_for(tmp_path, text, "assets[0].max_mw")
    assert_names(
        issue, line_of(text, 'max_mw: "abc"'), "assets[0].max_mw", "expected float, got str"
    )


def test_wrong_type_for_name_suggests_quoting(tmp_path: Path) -> None:
    text = GOOD.replace("name: BESS 1", "name: yes")
    issue = issue_for(tmp_path, text, "assets[1].name")
    assert_names(issue, line_of(text, "name: yes"), "assets[1].name", "got bool", "quote")


def test_negative_capacity(tmp_path: Path) -> None:
    text = GOOD.replace("capacity_mwh: 4.0", "capacity_mwh: -4.0")
    issue = issue_for(tmp_path, text, "assets[0].capacity_mwh")
    assert_names(issue, line_of(text, "capacity_mwh: -4.0"), "assets[0].capacity_mwh", ">= 0")


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_efficiency_out_of_range(tmp_path: Path, value: str) -> None:
    text = GOOD.replace("efficiency: 0.9", f"efficiency: {value}")
    issue = issue_for(tmp_path, text, "assets[0].efficiency")
    assert_names(issue, line_of(text, f"efficiency: {value}"), "assets[0].efficiency", "(0, 1]")


def test_non_positive_ramp_rate(tmp_path: Path) -> None:
    text = GOOD.replace("ramp_rate_mw_per_min: 1.0", "ramp_rate_mw_per_min: 0")
    issue = issue_for(tmp_path, text, "assets[0].ramp_rate_mw_per_min")
    assert_names(issue, line_of(text, "ramp_rate_mw_per_min: 0"), None, "> 0")


def test_missing_limit(tmp_path: Path) -> None:
    text = GOOD.replace("    max_mw: 1\n", "")
    issue = issue_for(tmp_path, text, "assets[1].max_mw")
    assert_names(issue, line_of(text, f"asset_id: {ASSET_1}"), "assets[1].max_mw", "missing")


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    text = GOOD.replace("max_mw: 2.0", "max_mv: 2.0")
    issue = issue_for(tmp_path, text, "assets[0].max_mv")
    assert_names(
        issue, line_of(text, "max_mv"), "assets[0].max_mv", "unknown key 'max_mv'",
        "did you mean 'max_mw'", "allowed keys: asset_id, site_id, name",
    )  # fmt: skip


def test_unknown_top_level_key(tmp_path: Path) -> None:
    text = GOOD + "asset:\n  - x\n"
    issue = issue_for(tmp_path, text, "asset")
    assert_names(issue, line_of(text, "asset:"), "asset", "unknown key", "sites, assets")


def test_duplicate_key_in_a_mapping(tmp_path: Path) -> None:
    text = GOOD.replace("max_mw: 2.0", "max_mw: 2.0\n    max_mw: 3.0")
    issue = issue_for(tmp_path, text, "assets[0].max_mw")
    assert_names(issue, line_of(text, "max_mw: 3.0"), "assets[0].max_mw", "duplicate key")


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    text = GOOD.replace("name: BESS 2", "name: [BESS 2")
    with pytest.raises(ConfigError) as caught:
        load_inventory(write(tmp_path, text), asset_types=TYPES)
    (issue,) = caught.value.issues
    assert "invalid YAML" in str(issue)
    assert issue.line is not None and issue.line >= line_of(text, "name: [BESS 2")
    assert f"assets.yaml:{issue.line}:" in str(issue)


def test_empty_file(tmp_path: Path) -> None:
    issue = issue_for(tmp_path, "# nothing here\n", None)
    assert_names(issue, 1, None, "empty")


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    issue = issue_for(tmp_path, "- sites\n- assets\n", None)
    assert_names(issue, 1, None, "must be a mapping", "got list")


def test_entry_not_a_mapping(tmp_path: Path) -> None:
    text = GOOD.replace(f"  - asset_id: {ASSET_1}", f"  - {ASSET_1}\n  - asset_id: {ASSET_1}")
    issue = issue_for(tmp_path, text, "assets[1]")
    assert_names(issue, line_of(text, f"  - {ASSET_1}"), "assets[1]", "expected a mapping")


def test_missing_sections(tmp_path: Path) -> None:
    issue = issue_for(tmp_path, "sites: []\n", "assets")
    assert_names(issue, 1, "assets", "missing required key 'assets'")


def test_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_inventory(tmp_path / "assets.yaml", asset_types=TYPES)
    assert "assets.yaml" in str(caught.value)
    assert "file not found" in str(caught.value)


# --------------------------------------------------------------------------- agent bindings

FINGERPRINT = "sha256:" + "ab" * 32
TOKEN_HASH = "c0" * 32


def with_agents(entries: str, site_marker: str = "    location: Depot Road\n") -> str:
    """GOOD with an ``agents:`` list (``entries`` indented for it) under site A."""
    return GOOD.replace(site_marker, site_marker + "    agents:\n" + entries)


def test_agents_are_read_in_canonical_form(tmp_path: Path) -> None:
    text = with_agents(
        f"      - fingerprint: SHA256:{':'.join(['AB'] * 32)}\n"
        "        name: gw-north\n"
        '      - subject: "CN = gw-north, O = Acme\\\\, Inc"\n'
        f"      - token_sha256: {TOKEN_HASH.upper()}\n"
    )
    inventory = load_inventory(write(tmp_path, text), asset_types=TYPES)
    bindings = inventory.site_agents(SITE_A.upper())
    assert bindings is not None
    assert [(b.kind, b.value, b.name) for b in bindings] == [
        ("fingerprint", FINGERPRINT, "gw-north"),
        ("subject", "CN=gw-north,O=Acme\\, Inc", None),
        ("token_sha256", TOKEN_HASH, None),
    ]
    assert bindings[0].line == line_of(text, "fingerprint:")
    assert inventory.site_agents(SITE_B) is None, "a site without agents: is not bound"
    assert inventory.site(SITE_A).name == "North Yard"


def test_a_short_fingerprint_names_its_line(tmp_path: Path) -> None:
    text = with_agents("      - fingerprint: sha256:abcd\n")
    issue = issue_for(tmp_path, text, "sites[0].agents[0].fingerprint")
    assert_names(issue, line_of(text, "sha256:abcd"), None, "64 hex digits")


def test_a_fingerprint_without_its_algorithm_is_refused(tmp_path: Path) -> None:
    text = with_agents(f"      - fingerprint: {'ab' * 32}\n")
    issue = issue_for(tmp_path, text, "sites[0].agents[0].fingerprint")
    assert_names(issue, line_of(text, "fingerprint:"), None, "sha256:<64 hex digits>")


def test_a_bad_token_hash_says_how_to_make_one(tmp_path: Path) -> None:
    text = with_agents("      - token_sha256: my-secret-token\n")
    issue = issue_for(tmp_path, text, "sites[0].agents[0].token_sha256")
    assert_names(issue, line_of(text, "token_sha256"), None, "der certs agent-token")


def test_a_bad_subject_is_refused(tmp_path: Path) -> None:
    text = with_agents('      - subject: "no equals sign"\n')
    issue = issue_for(tmp_path, text, "sites[0].agents[0].subject")
    assert_names(issue, line_of(text, "subject:"), None, "RFC 4514")


def test_an_entry_needs_exactly_one_identity(tmp_path: Path) -> None:
    text = with_agents(
        f"      - fingerprint: {FINGERPRINT}\n        token_sha256: {TOKEN_HASH}\n"
        "      - name: nobody\n"
    )
    both = issue_for(tmp_path, text, "sites[0].agents[0]")
    assert_names(both, line_of(text, "fingerprint:"), None, "exactly one", "fingerprint and")
    none = issue_for(tmp_path, text, "sites[0].agents[1]")
    assert_names(none, line_of(text, "name: nobody"), None, "exactly one", "none of them")


def test_an_unknown_key_in_an_entry_suggests_the_right_one(tmp_path: Path) -> None:
    text = with_agents(f"      - fingerprint: {FINGERPRINT}\n        nmae: x\n")
    issue = issue_for(tmp_path, text, "sites[0].agents[0].nmae")
    assert_names(issue, line_of(text, "nmae"), None, "did you mean 'name'")


def test_an_identity_listed_twice_names_the_first_line(tmp_path: Path) -> None:
    text = with_agents(
        f"      - fingerprint: {FINGERPRINT}\n      - fingerprint: {FINGERPRINT.upper()}\n"
    )
    issue = issue_for(tmp_path, text, "sites[0].agents[1].fingerprint")
    first = line_of(text, "fingerprint:")
    assert_names(issue, line_of(text, "fingerprint:", 2), None, f"first on line {first}")


def test_an_empty_agents_list_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("    location: Depot Road\n", "    location: Depot Road\n    agents: []\n")
    issue = issue_for(tmp_path, text, "sites[0].agents")
    assert_names(issue, line_of(text, "agents: []"), None, "binds no agent", "remove the key")


def test_agents_must_be_a_list_of_mappings(tmp_path: Path) -> None:
    text = with_agents("      - sha256:abc\n")
    issue = issue_for(tmp_path, text, "sites[0].agents[0]")
    assert_names(issue, line_of(text, "- sha256:abc"), None, "expected a mapping")
    text = GOOD.replace("    location: Depot Road\n", "    location: Depot Road\n    agents: x\n")
    issue = issue_for(tmp_path, text, "sites[0].agents")
    assert_names(issue, line_of(text, "agents: x"), None, "expected a list")


def test_the_documented_agents_example_loads() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "inventory.md").read_text()
    block = next(b for b in doc.split("```yaml\n")[1:] if "token_sha256:" in b).split("```")[0]
    inventory = parse_inventory(block, "docs/inventory.md", asset_types=TYPES)
    bound = [inventory.site_agents(site_id) for site_id in inventory.sites]
    kinds = {b.kind for bindings in bound if bindings for b in bindings}
    assert kinds == {"fingerprint", "subject", "token_sha256"}


# --------------------------------------------------------------- coordinates, split policy


def test_coordinates_and_split_policy_load(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    location: Depot Road\n",
        "    location: Depot Road\n    latitude: 52.37\n    longitude: -4.9\n"
        "    split_policy: headroom\n",
    ).replace("    location: container 1\n", "    location: container 1\n    latitude: -33.9\n")
    inventory = load_inventory(write(tmp_path, text), asset_types=TYPES)
    site = inventory.site(SITE_A)
    assert (site.latitude, site.longitude, site.split_policy) == (52.37, -4.9, "headroom")
    assert inventory.site(SITE_B).latitude is None
    assert inventory.asset(ASSET_1).latitude == -33.9
    assert inventory.asset(ASSET_1).longitude is None


@pytest.mark.parametrize(
    ("key", "value", "section", "bound"),
    [
        ("latitude", "91", "sites[0]", "[-90, 90]"),
        ("longitude", "-180.5", "sites[0]", "[-180, 180]"),
        ("latitude", "north", "sites[0]", "expected float"),
    ],
)
def test_site_coordinates_out_of_range_name_file_line_and_field(
    tmp_path: Path, key: str, value: str, section: str, bound: str
) -> None:
    text = GOOD.replace(
        "    location: Depot Road\n", f"    location: Depot Road\n    {key}: {value}\n"
    )
    issue = issue_for(tmp_path, text, f"{section}.{key}")
    assert_names(issue, line_of(text, f"{key}: {value}"), f"{section}.{key}", bound)


def test_asset_latitude_out_of_range_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    location: container 1\n", "    location: container 1\n    latitude: 95\n"
    )
    issue = issue_for(tmp_path, text, "assets[1].latitude")
    assert_names(issue, line_of(text, "latitude: 95"), "assets[1].latitude", "[-90, 90]", "95")


def test_an_unknown_site_split_policy_lists_the_installed_ones(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    location: Depot Road\n", "    location: Depot Road\n    split_policy: greedy\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_inventory(
            write(tmp_path, text), asset_types=TYPES, split_policies=["equal", "headroom"]
        )
    (issue,) = [i for i in caught.value.issues if i.field == "sites[0].split_policy"]
    assert_names(issue, line_of(text, "split_policy: greedy"), None, "'greedy'", "equal, headroom")


def test_a_site_split_policy_is_checked_against_the_installed_plugins(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    location: Depot Road\n", "    location: Depot Road\n    split_policy: soc_balancing\n"
    )
    assert load_inventory(write(tmp_path, text), asset_types=TYPES).site(SITE_A).split_policy
    with pytest.raises(ConfigError, match="unknown split policy 'nope'"):
        load_inventory(write(tmp_path, text.replace("soc_balancing", "nope")), asset_types=TYPES)
