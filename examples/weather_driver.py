"""A worked example of a userland driver: a deterministic fake weather service
and a unit converter (no network: the "weather" is a hash of city and day).

    llmos driver run examples/weather_driver.py      # serves weather.* tools
    llmos call tool.list weather
    llmos call tool.call weather.forecast '{"city": "Oslo", "days": 2}'

or from Python, in any process holding the capability ``tool:weather.*``:

    c = llmagentos.connect()
    c.tool.call("weather.convert", {"value": 20, "unit_from": "C", "unit_to": "F"})

Each ``@tool`` method becomes ``weather.<method>``; its JSON Schema comes from
the type hints (``Annotated`` adds JSON Schema keywords), its descriptions
from the docstring. Exceptions become errnos: ValueError is EINVAL,
``ERRORS["ENOENT"]`` is ENOENT, anything unexpected EIO.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Literal

from llmagentos import ERRORS, Driver, tool

Unit = Literal["C", "F", "K"]
CONDITIONS = ("sunny", "cloudy", "rain", "snow", "fog", "wind")


@dataclass
class Day:
    day: int
    condition: str
    high: float
    low: float
    unit: str


def _to_kelvin(value: float, unit: Unit) -> float:
    return {"C": value + 273.15, "F": (value - 32) * 5 / 9 + 273.15, "K": value}[unit]


def _from_kelvin(value: float, unit: Unit) -> float:
    return {"C": value - 273.15, "F": (value - 273.15) * 9 / 5 + 32, "K": value}[unit]


class WeatherDriver(Driver):
    """namespace "weather" (the class name, less "Driver")."""

    @tool
    def forecast(self, city: str, days: Annotated[int, {"minimum": 1, "maximum": 7}] = 1,
                 unit: Unit = "C") -> list[Day]:
        """The weather forecast for a city, one entry per day.

        Deterministic: the same city and day always give the same weather.

        Args:
            city: the city's name, e.g. "Oslo"
            days: how many days ahead, 1 to 7
            unit: temperature unit: C (Celsius), F (Fahrenheit) or K (Kelvin)
        """
        # days is 1..7 already: the kernel checked the schema's minimum and maximum
        if not city.strip():
            raise ERRORS["ENOENT"]("no city with an empty name")
        out = []
        for d in range(1, days + 1):
            h = hashlib.sha256(f"{city.strip().lower()}/{d}".encode()).digest()
            high_c = -10 + h[0] % 40
            low_c = high_c - 3 - h[1] % 8
            out.append(Day(d, CONDITIONS[h[2] % len(CONDITIONS)],
                           round(_from_kelvin(_to_kelvin(high_c, "C"), unit), 1),
                           round(_from_kelvin(_to_kelvin(low_c, "C"), unit), 1), unit))
        return out

    @tool
    def convert(self, value: float, unit_from: Unit, unit_to: Unit) -> float:
        """Convert a temperature between Celsius, Fahrenheit and Kelvin.

        Args:
            value: the temperature
            unit_from: its unit
            unit_to: the unit wanted
        """
        kelvin = _to_kelvin(value, unit_from)
        if kelvin < 0:
            raise ValueError(f"{value} {unit_from} is below absolute zero")
        return round(_from_kelvin(kelvin, unit_to), 4)

    @tool(name="list")  # the tool is weather.list; a method named `list` would hide the builtin
    def list_cities(self) -> list[str]:
        """Cities with a forecast: any name works; these are examples."""
        return ["Oslo", "Lagos", "Lima", "Hanoi"]


if __name__ == "__main__":
    WeatherDriver().run()  # under the kernel: `llmos spawn -- python weather_driver.py`
