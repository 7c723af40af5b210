"""Several headend addresses: the list in ``HEADEND_GRPC`` and ``--headend``, and the order
and delays in which the link tries them (der_sdk_agent.headends)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from der_sdk.backoff import Backoff
from der_sdk.errors import DerSdkError
from der_sdk.testing.faults import free_port
from der_sdk_agent.headends import HeadendRotation, parse_headend_addresses
from der_sdk_agent.settings import AgentSettings
from tests.agent.conftest import SITE, MakeAgent
from tests.agent.fake_headend import FakeHeadend

ENV = {"ASSETS_PATH": "a.yaml", "GATEWAY_SITE_ID": SITE}


# ----------------------------------------------------------------------------- the list


def test_a_comma_separated_list_keeps_its_order_and_tolerates_whitespace() -> None:
    settings = AgentSettings.from_env(
        {**ENV, "HEADEND_GRPC": " a.example:50051 ,b.example:50052,\t[2001:db8::7]:50051 "}
    )
    assert settings.headends == ("a.example:50051", "b.example:50052", "[2001:db8::7]:50051")
    assert settings.headend == "a.example:50051,b.example:50052,[2001:db8::7]:50051"


def test_one_address_is_taken_as_it_was() -> None:
    settings = AgentSettings.from_env({**ENV, "HEADEND_GRPC": "headend.example:6000"})
    assert settings.headend == "headend.example:6000"
    assert settings.headends == ("headend.example:6000",)
    assert AgentSettings.from_env(ENV).headends == ("127.0.0.1:50051",)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("a:1,,b:2", "HEADEND_GRPC='a:1,,b:2': entry 2 is empty"),
        ("a:1,b:2,", "entry 3 is empty"),
        ("a:1,b", "entry 2 (b) has no port"),
        ("a:1,b:http", "entry 2 (b:http): port 'http' is not a number from 1 to 65535"),
        ("a:1,b:70000", "entry 2 (b:70000): port '70000'"),
        ("a:1,b:0", "entry 2 (b:0): port '0'"),
        ("a:0x10", "HEADEND_GRPC='a:0x10' (a:0x10): port '0x10'"),
        ("a:1,::1:50051", "entry 2 (::1:50051) looks like an IPv6 address: put it in brackets"),
        ("[::1:50051", "is not [IPv6 address]:port"),
        ("[headend]:50051", "'headend' in brackets is not an IPv6 address"),
        ("[::1]", "is not [IPv6 address]:port"),
        ("a:1,b :2", "entry 2 ('b :2') contains whitespace"),
        ("a:50051,b:50051,A:50051", "entry 3 (A:50051) repeats a:50051; list each headend once"),
        ("[::1]:50051,[0:0::1]:50051", "entry 2 ([0:0::1]:50051) repeats [::1]:50051"),
    ],
)
def test_a_bad_list_is_refused_naming_the_variable_and_the_entry(value: str, needle: str) -> None:
    with pytest.raises(DerSdkError) as caught:
        AgentSettings.from_env({**ENV, "HEADEND_GRPC": value})
    assert needle in str(caught.value)
    assert "HEADEND_GRPC" in str(caught.value)


def test_an_address_sequence_is_checked_like_the_variable() -> None:
    assert parse_headend_addresses(["a:1", "b:2"]) == ("a:1", "b:2")
    with pytest.raises(DerSdkError, match=r"headend='a:1,a:1': entry 2 \(a:1\) repeats a:1"):
        parse_headend_addresses(["a:1", "a:1"], source="headend")


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--headend", "127.0.0.1:1,,127.0.0.1:2"], {}, "--headend='127.0.0.1:1,,127.0.0.1:2'"),
        ([], {"HEADEND_GRPC": "127.0.0.1:1,127.0.0.1:99999"}, "HEADEND_GRPC='127.0.0.1:1,"),
    ],
)
@pytest.mark.parametrize("command", ["agent", "launch"])
def test_der_agent_and_launch_exit_2_on_a_bad_list_naming_where_it_came_from(
    tmp_path: Path, command: str, args: list[str], env: dict[str, str], needle: str
) -> None:
    inventory = tmp_path / "assets.yaml"
    inventory.write_text(f"sites:\n  - {{site_id: {SITE}, name: Yard}}\nassets: []\n")
    mode = ["--site-id", SITE] if command == "agent" else []
    environment = {k: v for k, v in os.environ.items() if k != "HEADEND_GRPC"}
    done = subprocess.run(
        [sys.executable, "-m", "der_sdk.cli", command, "--assets", str(inventory), *mode, *args],
        capture_output=True,
        text=True,
        env={**environment, **env},
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert needle in done.stderr, done.stderr


# ----------------------------------------------------------------------------- the order


def _rotation(addresses: list[str], seed: int = 1) -> HeadendRotation:
    return HeadendRotation(addresses, Backoff(1.0, 120.0, random.Random(seed), jitter=0.0))


def test_the_start_is_random_and_repeatable_with_a_seed() -> None:
    addresses = ["a:1", "b:1", "c:1"]
    firsts = {_rotation(addresses, seed).current for seed in range(40)}
    assert firsts == set(addresses), "every address is somebody's first"
    assert _rotation(addresses, 7).order == _rotation(addresses, 7).order
    assert sorted(_rotation(addresses, 7).order) == addresses


def test_one_address_keeps_the_single_headend_schedule() -> None:
    rotation = _rotation(["a:1"])
    backoff = rotation.backoff
    assert [rotation.failed() for _ in range(4)] == [backoff.base(n) for n in (1, 2, 3, 4)]
    assert rotation.current == "a:1"
    rotation.registered()
    assert rotation.failed() == backoff.base(1)


def test_each_address_is_tried_once_quickly_before_the_delay_grows() -> None:
    rotation = _rotation(["a:1", "b:1", "c:1"])
    order = rotation.order
    tried, delays = [rotation.current], []
    for _ in range(6):
        delays.append(rotation.failed())
        tried.append(rotation.current)
    assert tried == [*order, *order, order[0]]
    # two quick hops, then the first round ends (1 s); two hops, then 1.6 s
    assert delays == [1.0, 1.0, 1.0, 1.0, 1.0, 1.6]


def test_a_good_register_resets_the_rounds_and_the_next_failure_moves_on() -> None:
    rotation = _rotation(["a:1", "b:1"])
    for _ in range(6):
        rotation.failed()  # three rounds failed: the next round would end at 2.56 * 1.6
    at = rotation.current
    rotation.registered()
    assert rotation.failed() == 1.0 and rotation.current != at
    assert rotation.failed() == 1.0 and rotation.current == at
    assert rotation.failed() == 1.0
    assert rotation.failed() == 1.6


# ----------------------------------------------------------------------------- the link


def _seed_starting_at(addresses: list[str], first: str) -> int:
    """A seed whose shuffled order starts at ``first`` (the agent's rng shuffles first)."""
    return next(s for s in range(100) if _rotation(addresses, s).current == first)


async def test_a_dead_first_address_is_skipped_for_the_next_one(
    headend: FakeHeadend, make_agent: MakeAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="der.agent")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    addresses = [dead, headend.address]
    seed = _seed_starting_at(addresses, dead)
    agent = make_agent(",".join(addresses), rng=random.Random(seed))
    assert agent.link.headend == dead
    assert agent.stats().headend is None
    loop = asyncio.get_running_loop()
    started = loop.time()
    await agent.start()
    async with asyncio.timeout(5):
        await agent.wait_connected()
    took = loop.time() - started
    stats = agent.stats()
    assert stats.headend == headend.address
    assert stats.failed_attempts == 1
    assert took < 2.0, f"one quick hop (reconnect_initial_s 0.05 s), took {took:.1f} s"
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        f"headend {dead} unreachable (attempt 1)" in line
        and f"trying headend {headend.address} in" in line
        for line in lines
    ), lines
    assert not any("moved from" in line for line in lines), "a first register is no move"


def test_the_documented_list_and_error_are_what_the_agent_reads_and_says() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "agent.md").read_text()
    (value,) = re.findall(r'^HEADEND_GRPC="([^"]+)"$', doc, re.M)
    assert len(AgentSettings.from_env({**ENV, "HEADEND_GRPC": value}).headends) == 3
    (bad, message) = re.search(r"`(HEADEND_GRPC='([^']*)': entry [^`]*)`", doc).group(2, 1)  # type: ignore[union-attr]
    with pytest.raises(DerSdkError) as caught:
        AgentSettings.from_env({**ENV, "HEADEND_GRPC": bad})
    assert str(caught.value) == " ".join(message.split())
