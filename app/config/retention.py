"""Retention rules: how long events of a stream (and event name) stay in the log's table.

A rule is ``STREAM[/EVENT]=AGE``: ``AGE`` is ``keep`` or a number followed by ``d``, ``h``,
``m`` or ``s``; ``*`` stands for any stream. An event follows the most specific rule that
names it (``stream/event``, then ``stream``, then ``*/event``, then ``*``); an event no rule
names is kept.
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["ANY", "RetentionRule", "parse_rule"]

#: A rule's stream or event that stands for any.
ANY = "*"

_RULE = re.compile(
    r"(?P<stream>\*|[A-Za-z0-9][A-Za-z0-9_.:-]{0,99})"
    r"(?:/(?P<event>[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}))?"
    r"=(?P<age>keep|(?P<number>\d{1,9})(?P<unit>[dhms]))"
)
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


class RetentionRule(NamedTuple):
    stream: str
    #: The event name, or ANY.
    event: str
    #: How old an event may grow before it is archived and removed; None: kept.
    max_age_seconds: int | None

    @property
    def label(self) -> str:
        """The rule as it is written in the configuration."""
        name = self.stream if self.event == ANY else f"{self.stream}/{self.event}"
        if self.max_age_seconds is None:
            return f"{name}=keep"
        for unit, seconds in _UNIT_SECONDS.items():
            if self.max_age_seconds % seconds == 0:
                return f"{name}={self.max_age_seconds // seconds}{unit}"
        raise AssertionError("every age is a whole number of seconds")

    @property
    def specificity(self) -> int:
        """Higher wins: stream/event, stream, */event, *."""
        return (self.stream != ANY) * 2 + (self.event != ANY)


def parse_rule(text: str) -> RetentionRule:
    """Raise ValueError, naming what is wrong, for a rule that is not ``STREAM[/EVENT]=AGE``."""
    found = _RULE.fullmatch(text.strip())
    if found is None:
        raise ValueError(
            f"a rule is STREAM[/EVENT]=AGE with AGE `keep` or a number and d, h, m or s "
            f"(agent/heartbeat=7d), got {text!r}"
        )
    number = found["number"]
    age = None if number is None else int(number) * _UNIT_SECONDS[found["unit"]]
    return RetentionRule(found["stream"], found["event"] or ANY, age)
