"""The agent config loader and its validation against plugins and the inventory."""

from __future__ import annotations

import textwrap
from pathlib import Path

import msgspec
import pytest

from der_sdk import hookimpl, load_plugins
from der_sdk.agent_config import (
    AgentConfig,
    AssetAdapterConfig,
    BufferConfig,
    EdgeServiceConfig,
    load_agent_config,
    parse_agent_config,
    validate_agent_config,
)
from der_sdk.errors import ConfigError, ConfigIssue
from der_sdk.extensions import (
    Adapter,
    AdapterContext,
    AdapterType,
    EdgeService,
    EdgeServiceContext,
    EdgeServiceType,
)
from der_sdk.inventory import Inventory, load_inventory, parse_inventory
from der_sdk.plugins import Plugins

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SITE = "6f1c2b1e-3d4a-4c5b-8e9f-0a1b2c3d4e5f"
ASSET_1 = "0b6c1e52-7f0e-4d8a-9a57-2c1f3e4d5a61"
ASSET_2 = "1c7d2f63-8a1f-4e9b-8b68-3d2a4f5e6b72"
STRANGER = "99999999-9999-4999-8999-999999999999"

GOOD = f"""\
agent_id: gw-north
telemetry_interval_s: 2
heartbeat_interval_s: 15
split_policy: equal
reconnect_initial_s: 1
reconnect_max_s: 60
link_loss_hold_s: 120
link_loss_fallback: hold
buffer:
  path: /var/lib/der/agent-{{agent_id}}.sqlite3
  max_mb: 64
  max_age_h: 48
  replay_samples_per_s: 500
  sync: normal
default_adapter: fake-bess
assets:
  {ASSET_1}:
    adapter: fake-bess
    options: {{initial_soc_pct: 40}}
  {ASSET_2}:
    options:
      initial_soc_pct: 90
edge_services:
  - name: fake-service
    options: {{port: 4840}}
"""


# --------------------------------------------------------------------------- fixtures


class FakeOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    initial_soc_pct: float = 50.0


class FakeServiceOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    port: int


def _make_adapter(context: AdapterContext) -> Adapter:
    raise NotImplementedError


def _make_service(context: EdgeServiceContext) -> EdgeService:
    raise NotImplementedError


class FakePlugin:
    @hookimpl
    def der_adapter_types(self) -> list[AdapterType]:
        return [
            AdapterType(name="fake-bess", factory=_make_adapter, options=FakeOptions),
            AdapterType(name="fake-plain", factory=_make_adapter),
        ]

    @hookimpl
    def der_edge_services(self) -> list[EdgeServiceType]:
        return [
            EdgeServiceType(name="fake-service", factory=_make_service, options=FakeServiceOptions)
        ]


@pytest.fixture
def plugins() -> Plugins:
    return load_plugins(entry_points=False, extra=[("fake", FakePlugin())], env={})


@pytest.fixture
def inventory() -> Inventory:
    assets = "".join(
        f"  - {{asset_id: {a}, site_id: {SITE}, name: {a[:4]}, max_mw: 1, min_mw: -1}}\n"
        for a in (ASSET_1, ASSET_2)
    )
    return parse_inventory(
        f"sites:\n  - {{site_id: {SITE}, name: North}}\nassets:\n{assets}", "inv.yaml",
        asset_types=["bess"],
    )  # fmt: skip


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(text: str, marker: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if marker in line)


def load_issue(tmp_path: Path, text: str, field: str | None) -> ConfigIssue:
    with pytest.raises(ConfigError) as caught:
        load_agent_config(write(tmp_path, text))
    return _pick(caught.value, field)


def validate_issue(
    tmp_path: Path, text: str, field: str, plugins: Plugins, inventory: Inventory
) -> ConfigIssue:
    cfg = load_agent_config(write(tmp_path, text))
    with pytest.raises(ConfigError) as caught:
        validate_agent_config(cfg, plugins, inventory, [ASSET_1, ASSET_2])
    return _pick(caught.value, field)


def _pick(error: ConfigError, field: str | None) -> ConfigIssue:
    matching = [i for i in error.issues if i.field == field]
    assert matching, f"no issue for {field!r} in:\n{error}"
    return matching[0]


def assert_names(issue: ConfigIssue, line: int, field: str | None, *words: str) -> None:
    text = str(issue)
    assert f"agent.yaml:{line}:" in text
    assert issue.line == line
    if field is not None:
        assert field in text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"


# --------------------------------------------------------------------------- good files


def test_defaults_without_a_file() -> None:
    cfg = load_agent_config(None)
    assert cfg == AgentConfig()
    assert cfg.agent_id is None
    assert (cfg.telemetry_interval_s, cfg.heartbeat_interval_s) == (4.0, 30.0)
    assert (cfg.reconnect_initial_s, cfg.reconnect_max_s) == (1.0, 120.0)
    assert (cfg.link_loss_hold_s, cfg.link_loss_fallback) == (300.0, "default")
    assert cfg.buffer == BufferConfig(
        path=None, max_mb=256.0, max_age_h=168.0, replay_samples_per_s=2000.0, sync="normal"
    )
    assert cfg.buffer.max_bytes == 256 * 1024 * 1024 and cfg.buffer.max_age_s == 7 * 86400
    assert cfg.split_policy == "capacity_weighted"
    assert cfg.default_adapter == "sim-bess"
    assert cfg.assets == {} and cfg.edge_services == []
    assert cfg.source_path is None


def test_good_file_loads(tmp_path: Path, plugins: Plugins, inventory: Inventory) -> None:
    path = write(tmp_path, GOOD)
    cfg = load_agent_config(path)
    assert cfg.source_path == str(path)
    assert cfg.agent_id == "gw-north"
    assert cfg.telemetry_interval_s == 2.0 and isinstance(cfg.telemetry_interval_s, float)
    assert cfg.split_policy == "equal"
    assert (cfg.link_loss_hold_s, cfg.link_loss_fallback) == (120.0, "hold")
    assert cfg.buffer == BufferConfig(
        path="/var/lib/der/agent-{agent_id}.sqlite3",
        max_mb=64.0,
        max_age_h=48.0,
        replay_samples_per_s=500.0,
        sync="normal",
    )
    assert cfg.line_of("buffer.sync") == line_of(GOOD, "sync: normal")
    assert load_agent_config(write(tmp_path, "buffer: {sync: full}\n")).buffer.sync == "full"
    assert cfg.assets == {
        ASSET_1: AssetAdapterConfig(adapter="fake-bess", options={"initial_soc_pct": 40}),
        ASSET_2: AssetAdapterConfig(adapter="fake-bess", options={"initial_soc_pct": 90}),
    }
    assert cfg.edge_services == [EdgeServiceConfig(name="fake-service", options={"port": 4840})]
    assert cfg.line_of(f"assets.{ASSET_1}.options.initial_soc_pct") == line_of(GOOD, "{initial")
    assert cfg.adapter_for(ASSET_1.upper()).options == {"initial_soc_pct": 40}
    assert cfg.adapter_for(STRANGER) == AssetAdapterConfig(adapter="fake-bess")
    validate_agent_config(cfg, plugins, inventory, [ASSET_1, ASSET_2])


def test_line_numbers_are_not_part_of_the_encoded_config(tmp_path: Path) -> None:
    cfg = load_agent_config(write(tmp_path, GOOD))
    encoded = msgspec.json.decode(msgspec.json.encode(cfg))
    assert "_lines" not in encoded and "_path" not in encoded
    assert msgspec.convert(encoded, AgentConfig) == cfg


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_agent_config(write(tmp_path, "# all defaults\n")) == AgentConfig()


def test_example_agent_config_loads_and_validates() -> None:
    cfg = load_agent_config(EXAMPLES / "agent.yaml")
    inventory = load_inventory(EXAMPLES / "assets.yaml")
    assert set(cfg.assets) <= set(inventory.assets)
    plugins = load_plugins()
    if "sim-bess" in plugins.adapter_types:  # the der-sdk-sim-bess plugin is installed
        validate_agent_config(cfg, plugins, inventory, list(inventory.assets))


# --------------------------------------------------------------------------- load errors


def test_wrong_type(tmp_path: Path) -> None:
    text = GOOD.replace("telemetry_interval_s: 2", "telemetry_interval_s: fast")
    issue = load_issue(tmp_path, text, "telemetry_interval_s")
    assert_names(issue, line_of(text, "fast"), "telemetry_interval_s", "expected float, got str")


def test_non_positive_interval(tmp_path: Path) -> None:
    text = GOOD.replace("heartbeat_interval_s: 15", "heartbeat_interval_s: 0")
    issue = load_issue(tmp_path, text, "heartbeat_interval_s")
    assert_names(issue, line_of(text, "heartbeat_interval_s"), "heartbeat_interval_s", "> 0")


def test_reconnect_max_below_initial(tmp_path: Path) -> None:
    text = GOOD.replace("reconnect_max_s: 60", "reconnect_max_s: 0.5")
    issue = load_issue(tmp_path, text, "reconnect_max_s")
    assert_names(issue, line_of(text, "reconnect_max_s"), "reconnect_max_s", "reconnect_initial_s")


@pytest.mark.parametrize(
    ("old", "new", "field", "words"),
    [
        ("max_mb: 64", "max_mb: 0", "buffer.max_mb", ["> 0 MiB"]),
        ("max_age_h: 48", "max_age_h: -1", "buffer.max_age_h", ["> 0 hours"]),
        ("replay_samples_per_s: 500", "replay_samples_per_s: lots", "buffer.replay_samples_per_s",
         ["expected float, got str"]),
        ("sync: normal", "sync: always", "buffer.sync", ["one of normal, full", "'always'"]),
        ("path: /var", "path: ''\n  old_path: /var", "buffer.path", ["must not be empty"]),
        ("max_mb: 64", "max_bytes: 64", "buffer.max_bytes", ["did you mean 'max_mb'"]),
        ("link_loss_hold_s: 120", "link_loss_hold_s: 0", "link_loss_hold_s", ["> 0"]),
        ("link_loss_fallback: hold", "link_loss_fallback: zero", "link_loss_fallback",
         ["one of default, hold", "'zero'"]),
    ],
)  # fmt: skip
def test_bad_durability_settings_name_file_line_and_field(
    tmp_path: Path, old: str, new: str, field: str, words: list[str]
) -> None:
    text = GOOD.replace(old, new)
    issue = load_issue(tmp_path, text, field)
    marker = new.split("\n")[0].split(":")[0]
    assert_names(issue, line_of(text, marker), field, *words)


def test_buffer_must_be_a_mapping(tmp_path: Path) -> None:
    text = "buffer: /tmp/agent.sqlite3\n"
    issue = load_issue(tmp_path, text, "buffer")
    assert_names(issue, 1, "buffer", "expected a mapping, got str")


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    text = GOOD.replace("split_policy:", "split_polcy:")
    issue = load_issue(tmp_path, text, "split_polcy")
    assert_names(
        issue, line_of(text, "split_polcy"), "split_polcy", "did you mean 'split_policy'",
        "allowed keys: agent_id",
    )  # fmt: skip


def test_unknown_key_in_asset_entry(tmp_path: Path) -> None:
    text = GOOD.replace("    adapter: fake-bess", "    adaptor: fake-bess")
    issue = load_issue(tmp_path, text, f"assets.{ASSET_1}.adaptor")
    assert_names(issue, line_of(text, "adaptor"), None, "allowed keys: adapter, options")


def test_asset_key_must_be_a_uuid(tmp_path: Path) -> None:
    text = GOOD.replace(f"  {ASSET_2}:", "  bess-2:")
    issue = load_issue(tmp_path, text, "assets.bess-2")
    assert_names(issue, line_of(text, "bess-2"), "assets.bess-2", "not an asset UUID")


def test_asset_configured_twice(tmp_path: Path) -> None:
    text = GOOD.replace(f"  {ASSET_2}:", f"  {ASSET_1.upper()}:")
    issue = load_issue(tmp_path, text, f"assets.{ASSET_1.upper()}")
    assert_names(
        issue, line_of(text, ASSET_1.upper()), None, "twice", f"line {line_of(text, ASSET_1)}"
    )


def test_options_must_be_a_mapping(tmp_path: Path) -> None:
    text = GOOD.replace("options: {port: 4840}", "options: [4840]")
    issue = load_issue(tmp_path, text, "edge_services[0].options")
    assert_names(issue, line_of(text, "[4840]"), None, "expected a mapping, got list")


def test_edge_service_needs_a_name(tmp_path: Path) -> None:
    text = GOOD.replace("  - name: fake-service\n    options", "  - options")
    issue = load_issue(tmp_path, text, "edge_services[0].name")
    assert_names(issue, line_of(text, "- options"), None, "missing required key 'name'")


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    text = GOOD.replace("split_policy: equal", "split_policy: 'equal")
    with pytest.raises(ConfigError) as caught:
        load_agent_config(write(tmp_path, text))
    (issue,) = caught.value.issues
    assert "invalid YAML" in str(issue) and issue.line is not None
    assert f"agent.yaml:{issue.line}:" in str(issue)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    issue = load_issue(tmp_path, "just text\n", None)
    assert_names(issue, 1, None, "must be a mapping", "got str")


def test_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent\.yaml: file not found"):
        load_agent_config(tmp_path / "agent.yaml")


# --------------------------------------------------------------------------- validation errors


def test_unknown_adapter_lists_installed(
    tmp_path: Path, plugins: Plugins, inventory: Inventory
) -> None:
    text = GOOD.replace("    adapter: fake-bess", "    adapter: modbus")
    field = f"assets.{ASSET_1}.adapter"
    issue = validate_issue(tmp_path, text, field, plugins, inventory)
    assert_names(issue, line_of(text, "modbus"), field, "unknown adapter 'modbus'", "fake-bess")


def test_unknown_default_adapter(tmp_path: Path, plugins: Plugins, inventory: Inventory) -> None:
    text = GOOD.replace("default_adapter: fake-bess", "default_adapter: nope")
    field = f"assets.{ASSET_2}.adapter"  # ASSET_2 relies on the default
    issue = validate_issue(tmp_path, text, field, plugins, inventory)
    assert_names(issue, line_of(text, f"{ASSET_2}:"), field, "unknown adapter 'nope'")


def test_unknown_default_adapter_for_unlisted_assets(
    tmp_path: Path, plugins: Plugins, inventory: Inventory
) -> None:
    text = "telemetry_interval_s: 4\ndefault_adapter: nope\n"
    issue = validate_issue(tmp_path, text, "default_adapter", plugins, inventory)
    assert_names(issue, 2, "default_adapter", "unknown adapter 'nope'", "fake-bess, fake-plain")


def test_bad_adapter_option_names_the_field(
    tmp_path: Path, plugins: Plugins, inventory: Inventory
) -> None:
    text = GOOD.replace("initial_soc_pct: 90", "initial_soc_pct: full")
    field = f"assets.{ASSET_2}.options.initial_soc_pct"
    issue = validate_issue(tmp_path, text, field, plugins, inventory)
    assert_names(issue, line_of(text, "full"), field, "expected float, got str", "fake-bess")


def test_unknown_adapter_option(tmp_path: Path, plugins: Plugins, inventory: Inventory) -> None:
    text = GOOD.replace("{initial_soc_pct: 40}", "{initial_soc: 40}")
    field = f"assets.{ASSET_1}.options"
    issue = validate_issue(tmp_path, text, field, plugins, inventory)
    assert_names(issue, line_of(text, "initial_soc:"), field, "unknown field initial_soc")


def test_options_for_an_adapter_without_options(
    tmp_path: Path, plugins: Plugins, inventory: Inventory
) -> None:
    text = GOOD.replace("    adapter: fake-bess", "    adapter: fake-plain")
    field = f"assets.{ASSET_1}.options"
    issue = validate_issue(tmp_path, text, field, plugins, inventory)
    assert_names(issue, line_of(text, "{initial_soc_pct: 40}"), field, "takes no options")


def test_asset_not_in_inventory(tmp_path: Path, plugins: Plugins, inventory: Inventory) -> None:
    text = GOOD.replace(f"  {ASSET_2}:", f"  {STRANGER}:")
    field = f"assets.{STRANGER}"
    issue = validate_issue(tmp_path, text, field, plugins, inventory)
    assert_names(issue, line_of(text, STRANGER), field, "not in the inventory", "inv.yaml")


def test_unknown_split_policy(tmp_path: Path, plugins: Plugins, inventory: Inventory) -> None:
    text = GOOD.replace("split_policy: equal", "split_policy: fair")
    issue = validate_issue(tmp_path, text, "split_policy", plugins, inventory)
    assert_names(
        issue, line_of(text, "fair"), "split_policy", "unknown split policy 'fair'",
        "capacity_weighted, equal",
    )  # fmt: skip


def test_unknown_edge_service(tmp_path: Path, plugins: Plugins, inventory: Inventory) -> None:
    text = GOOD.replace("name: fake-service", "name: opcua-server")
    field = "edge_services[0].name"
    issue = validate_issue(tmp_path, text, field, plugins, inventory)
    assert_names(
        issue, line_of(text, "opcua-server"), field, "unknown edge service", "fake-service"
    )


def test_bad_edge_service_option(tmp_path: Path, plugins: Plugins, inventory: Inventory) -> None:
    text = GOOD.replace("{port: 4840}", "{port: '4840'}")
    field = "edge_services[0].options.port"
    issue = validate_issue(tmp_path, text, field, plugins, inventory)
    assert_names(issue, line_of(text, "port:"), field, "expected int, got str")


def test_validation_reports_every_issue(plugins: Plugins, inventory: Inventory) -> None:
    text = GOOD.replace("split_policy: equal", "split_policy: fair").replace(
        "name: fake-service", "name: nope"
    )
    cfg = parse_agent_config(text, "inline.yaml")
    with pytest.raises(ConfigError) as caught:
        validate_agent_config(cfg, plugins, inventory, [ASSET_1])
    assert [i.field for i in caught.value.issues] == ["split_policy", "edge_services[0].name"]
