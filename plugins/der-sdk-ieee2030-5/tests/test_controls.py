"""What a DERControl maps to, and the precedence between overlapping controls."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import msgspec
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from der_sdk_ieee2030_5.controls import Control, Mapped, NotMapped, map_control, resolve
from der_sdk_ieee2030_5.identity import certificate_lfdi, sfdi_of_lfdi
from der_sdk_ieee2030_5.options import Ieee20305Options
from envoy_schema.server.schema.sep2.der import DERControlBase
from envoy_schema.server.schema.sep2.der_control_types import ActivePower

from der_sdk.models import Asset

BESS = Asset(asset_id="b", site_id="s", name="b", asset_type="bess", max_mw=4, min_mw=-2)
PV = Asset(asset_id="p", site_id="s", name="p", asset_type="pv", max_mw=10, min_mw=0)


def power(watts: int, multiplier: int = 0) -> ActivePower:
    return ActivePower(value=watts, multiplier=multiplier)


def test_target_w_becomes_a_signed_mw_setpoint() -> None:
    assert map_control(DERControlBase(opModTargetW=power(1500, 3)), [BESS]) == Mapped(
        1.5, "opModTargetW"
    )
    assert map_control(DERControlBase(opModTargetW=power(-2000, 3)), [BESS]) == Mapped(
        -2.0, "opModTargetW"
    )


def test_fixed_w_is_a_share_of_max_or_min() -> None:
    assert map_control(DERControlBase(opModFixedW=5000), [BESS]) == Mapped(2.0, "opModFixedW")
    assert map_control(DERControlBase(opModFixedW=-5000), [BESS]) == Mapped(-1.0, "opModFixedW")


def test_limits_cap_generation_but_are_refused_for_storage() -> None:
    capped = map_control(
        DERControlBase(opModMaxLimW=5000, opModExpLimW=power(3, 6)), [PV]
    )  # 50 % of 10 MW and 3 MW: the lower wins
    assert capped == Mapped(3.0, "opModExpLimW")
    refused = map_control(DERControlBase(opModExpLimW=power(3, 6)), [BESS])
    assert isinstance(refused, NotMapped)
    assert "opModExpLimW" in refused.reason and "generation" in refused.reason


def test_de_energize_is_zero_and_curves_are_not_mapped() -> None:
    assert map_control(DERControlBase(opModEnergize=False), [BESS]) == Mapped(0.0, "opModEnergize")
    result = map_control(
        DERControlBase(opModTargetVar=None, opModFixedVar=None, rampTms=100), [BESS]
    )
    assert result == NotMapped("no mapped control in rampTms")


def control(mrid: str, start: int, end: int, *, primacy: int = 1, created: int = 0) -> Control:
    return Control(
        mrid=mrid,
        program_mrid=f"P{primacy}",
        primacy=primacy,
        creation_time=created,
        start=start,
        duration=end - start,
        status=0,
        base=DERControlBase(opModTargetW=power(1)),
    )


def test_lower_primacy_wins_and_the_other_resumes_after_it() -> None:
    low = control("LOW", 0, 100, primacy=10)
    high = control("HIGH", 40, 60, primacy=1)
    result = resolve([low, high], now=0)
    assert result.windows == {"LOW": [(0, 40), (60, 100)], "HIGH": [(40, 60)]}


def test_equal_primacy_the_newer_control_wins() -> None:
    old = control("OLD", 0, 100, created=1)
    new = control("NEW", 50, 150, created=2)
    assert resolve([old, new], now=0).windows == {"OLD": [(0, 50)], "NEW": [(50, 150)]}
    # created later but in a program of higher primacy value: it loses
    later_low = control("LATER", 50, 150, primacy=5, created=3)
    assert resolve([old, later_low], now=0).windows == {"OLD": [(0, 100)], "LATER": [(100, 150)]}


def test_a_fully_covered_control_is_superseded() -> None:
    inner = control("INNER", 10, 20, primacy=5)
    outer = control("OUTER", 0, 100, primacy=1)
    result = resolve([inner, outer], now=0)
    assert result.superseded_by == {"INNER": "OUTER"}
    assert "INNER" not in result.windows


def test_ended_and_cancelled_controls_are_left_out() -> None:
    ended = control("ENDED", 0, 10)
    gone = dataclasses.replace(control("GONE", 0, 100), status=2)  # cancelled upstream
    result = resolve([ended, gone], now=50)
    assert result.windows == {} and result.superseded_by == {}


def test_lfdi_and_sfdi_of_a_certificate(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "dev")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "dev.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fingerprint = cert.fingerprint(hashes.SHA256())
    lfdi = certificate_lfdi(path)
    assert lfdi == fingerprint[:20].hex().upper()
    sfdi = sfdi_of_lfdi(lfdi)
    assert str(sfdi)[:-1] == str(int(lfdi[:9], 16))
    assert sum(int(d) for d in str(sfdi)) % 10 == 0
    # the example of IEEE 2030.5 section 6.3.4
    assert sfdi_of_lfdi("3E4F45AB31EDFE5B67E343E5E4562E31984E23E5") == 167261211391


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"server_url": "http://utility.example/dcap"}, "plain http"),
        (
            {"server_url": "http://utility.example/dcap", "allow_plain_http": True},
            "only for a loopback server",
        ),
        ({"server_url": "https://utility.example/dcap"}, "needs cert and key"),
        ({"server_url": "ftp://x/dcap"}, "https URL"),
        (
            {
                "server_url": "http://127.0.0.1:1/dcap",
                "allow_plain_http": True,
                "end_devices": [{"site_id": "a", "lfdi": "12"}],
            },
            "40 hex digits",
        ),
        (
            {
                "server_url": "http://127.0.0.1:1/dcap",
                "allow_plain_http": True,
                "end_devices": [{"site_id": "a", "asset_id": "b", "lfdi": "A" * 40}],
            },
            "site_id or asset_id",
        ),
    ],
)
def test_bad_options_are_refused_naming_what(options: dict[str, object], message: str) -> None:
    body = {"end_devices": [{"site_id": "s", "lfdi": "A" * 40}], **options}
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(body, Ieee20305Options)


def test_the_docs_example_options_are_valid() -> None:
    docs = Path(__file__).resolve().parents[3] / "docs" / "programs.md"
    section = docs.read_text().split("## IEEE 2030.5", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (program,) = yaml.safe_load(block)["programs"]
    assert program["source"] == "ieee2030.5"
    options = msgspec.convert(program["options"], Ieee20305Options)
    assert [d.site_id or d.asset_id for d in options.end_devices] == [
        *program["sites"],
        *program["assets"],
    ]
