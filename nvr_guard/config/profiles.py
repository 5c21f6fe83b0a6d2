"""What the regulations fix, in one place to check against them: the built-in retention profiles
(``profile: school``) and the longest an approval may stay valid.

A site names a profile instead of writing its own numbers, so that "a school keeps a year" is
written once, with its source, and a ``keep:`` or ``min_keep:`` of the site's own overrides only
that one value (see ``models.resolve_keep``).
"""

from __future__ import annotations

from dataclasses import dataclass

from nvr_guard.text import Duration


@dataclass(frozen=True)
class Profile:
    """A built-in retention rule: ceiling, floor, and the regulation it comes from."""

    keep: Duration
    min_keep: Duration | None
    source: str


PROFILES: dict[str, Profile] = {
    "highway": Profile(
        Duration.parse("15d"), None, "highway toll monitoring: 15-day playback window"
    ),
    "residential": Profile(
        Duration.parse("30d"), Duration.parse("30d"), "residential compounds: 30 days minimum"
    ),
    "general": Profile(Duration.parse("6mo"), None, "generic custody rules: up to 6 months"),
    "school": Profile(Duration.parse("1y"), None, "school monitoring: 1 year, then delete"),
}

# The rule: an approved request is valid for at most 30 days, then must be re-applied for.
MAX_VALID_FOR = Duration.parse("30d")
