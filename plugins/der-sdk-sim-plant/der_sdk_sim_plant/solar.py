"""Where the sun is and how much of it reaches the ground under a clear sky.

Textbook approximations, good to a degree or so, plenty for a simulator: Cooper's
declination, a three-term equation of time, and the Haurwitz clear-sky model of global
horizontal irradiance.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

__all__ = ["clear_sky_ghi_wm2", "solar_elevation_deg"]

_TILT_OF_EARTH_DEG = 23.44


def solar_elevation_deg(when: datetime, latitude: float, longitude: float) -> float:
    """The sun's elevation above the horizon, in degrees (negative at night).

    :param when: an aware time (a naive one is taken as UTC).
    :param latitude: degrees north (negative south).
    :param longitude: degrees east (negative west).
    """
    utc = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    day = utc.timetuple().tm_yday
    hours = utc.hour + utc.minute / 60 + (utc.second + utc.microsecond / 1e6) / 3600
    declination = math.radians(_TILT_OF_EARTH_DEG) * math.sin(2 * math.pi * (284 + day) / 365)
    b = 2 * math.pi * (day - 81) / 364
    equation_of_time_min = 9.87 * math.sin(2 * b) - 7.53 * math.cos(b) - 1.5 * math.sin(b)
    solar_hours = hours + longitude / 15 + equation_of_time_min / 60
    hour_angle = math.radians(15 * (solar_hours - 12))
    lat = math.radians(latitude)
    sin_elevation = math.sin(lat) * math.sin(declination) + math.cos(lat) * math.cos(
        declination
    ) * math.cos(hour_angle)
    return math.degrees(math.asin(max(-1.0, min(1.0, sin_elevation))))


def clear_sky_ghi_wm2(elevation_deg: float) -> float:
    """Global horizontal irradiance under a clear sky (Haurwitz), in W/m²; 0 at night."""
    if elevation_deg <= 0:
        return 0.0
    cos_zenith = math.sin(math.radians(elevation_deg))
    return 1098.0 * cos_zenith * math.exp(-0.057 / cos_zenith)
