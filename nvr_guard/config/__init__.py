"""The config file: strict YAML -> pydantic models, every error reported as ``FILE:LINE: message``.

Why so strict (house style, after fail2ban's silent fall-backs and Frigate's config incidents):
a retention daemon that guesses deletes footage. So:

- The YAML is read by :class:`StrictLoader`, which builds *no* implicit types. YAML 1.1 (what
  PyYAML implements) turns ``keep: no`` into ``False``, ``level: 010`` into octal 8 and ``1:30``
  into 90; every plain scalar here stays text and the field's own validator converts it
  explicitly (a decimal int without leading zeros, ``true``/``false``, a duration ...), refusing
  the YAML 1.1 readings with a message that says what the admin most likely meant.
- Duplicate keys (silently "last one wins" in PyYAML) and aliases are refused.
- The line of every key and value is remembered, so each pydantic error is mapped back to the
  line it is about; all errors are collected, not just the first.
- Checks that need more than one field (``keep`` < ``min_keep``, overlapping roots, a layout in its
  timezone, roots on disk) run after the field checks, on every site that passed them, so one
  ``config check`` run lists everything to fix.

The package follows those steps, each module importing only the ones before it:

- ``loader``: YAML -> plain data and the line of every key (no knowledge of the config's keys);
- ``profiles``: the numbers the regulations fix (retention profiles, the longest approval);
- ``types``: each field's conversion from the text the admin wrote;
- ``models``: the sections as pydantic models, and :class:`Config`, what the daemon reads;
- ``checks``: what spans fields or looks at the host (roots, mounts, key location, fonts);
- ``validate``: bytes -> Config or every error, the entry points below.

Public API: :func:`load_config`, :func:`check_config`, :class:`Config`; the other names here are
re-exported so that callers need not know which module holds them.
"""

from __future__ import annotations

from nvr_guard.config.checks import DAEMON_USER
from nvr_guard.config.loader import Problem, StrictLoader
from nvr_guard.config.models import (
    DEFAULT_EXTENSIONS,
    DEFAULT_WATERMARK,
    X264_PRESETS,
    Approval,
    Camera,
    Config,
    Disk,
    Emergency,
    Export,
    Group,
    Guards,
    Media,
    Metrics,
    People,
    Site,
    SiteApproval,
    User,
)
from nvr_guard.config.profiles import MAX_VALID_FOR, PROFILES, Profile
from nvr_guard.config.validate import check_config, load_config, parse_config
from nvr_guard.text import DURATION_HINT, fmt_duration

__all__ = [
    "DAEMON_USER",
    "DEFAULT_EXTENSIONS",
    "DEFAULT_WATERMARK",
    "DURATION_HINT",
    "MAX_VALID_FOR",
    "PROFILES",
    "X264_PRESETS",
    "Approval",
    "Camera",
    "Config",
    "Disk",
    "Emergency",
    "Export",
    "Group",
    "Guards",
    "Media",
    "Metrics",
    "People",
    "Problem",
    "Profile",
    "Site",
    "SiteApproval",
    "StrictLoader",
    "User",
    "check_config",
    "fmt_duration",
    "load_config",
    "parse_config",
]
