"""Which series of a received study is the plain CT and which the contrast CT (the rule is configurable).

The rule, in order, for every CT series with at least ``min_slices`` instances:

1. its SeriesDescription matches one of ``plain_patterns`` (e.g. "non-contrast", "native"): plain;
2. one of ``contrast_tags`` (ContrastBolusAgent, ...) holds a value: contrast;
3. its SeriesDescription matches one of ``contrast_patterns`` (e.g. "contrast", "C+", "venous"): contrast;
4. otherwise: plain.

Of each kind the series with the most instances is taken. The OARs are contoured on the plain CT and
the GTVs on the contrast CT; a study with only a plain CT gets the OARs, one with only a contrast CT
gets both on that series (noted), and one without a usable CT series is not contoured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CONTRAST_TAGS = ("ContrastBolusAgent", "ContrastBolusIngredient", "ContrastBolusRoute", "ContrastBolusVolume")


@dataclass(frozen=True)
class SelectionRule:
    """The configurable part of the rule (regular expressions match case-insensitively)."""

    contrast_tags: tuple[str, ...] = CONTRAST_TAGS
    contrast_patterns: tuple[str, ...] = (r"contrast", r"\bc\+", r"\bce\b", r"enhanced", r"venous", r"arterial",
                                          r"\bkm\b", r"\bpost\b")
    plain_patterns: tuple[str, ...] = (r"non[- ]?contrast", r"without contrast", r"\bnative\b", r"\bplain\b",
                                       r"\bnc\b", r"\bc-")
    min_slices: int = 10

    def __post_init__(self) -> None:
        from ..errors import InputError

        for pattern in (*self.contrast_patterns, *self.plain_patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"[selection] pattern {pattern!r} is not a regular expression ({exc}).") from None


@dataclass(frozen=True)
class SeriesSummary:
    """What the rule looks at in one received series."""

    series_uid: str
    modality: str
    description: str
    instances: int
    contrast_values: tuple[str, ...] = ()  # the contrast tags that hold a value


@dataclass(frozen=True)
class Selection:
    """The rule's verdict for a study: the series to use, the tasks, and why."""

    plain: str | None
    contrast: str | None
    tasks: tuple[str, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def usable(self) -> bool:
        return bool(self.tasks)


def classify(series: SeriesSummary, rule: SelectionRule) -> tuple[str, str]:
    """("plain" | "contrast", why) for one CT series."""
    text = series.description or ""
    for pattern in rule.plain_patterns:
        if re.search(pattern, text, re.IGNORECASE):
            return "plain", f"its SeriesDescription matches {pattern!r}"  # the text itself may name the patient
    tags = [t for t in series.contrast_values if t in rule.contrast_tags]
    if tags:
        return "contrast", f"{tags[0]} is set"
    for pattern in rule.contrast_patterns:
        if re.search(pattern, text, re.IGNORECASE):
            return "contrast", f"its SeriesDescription matches {pattern!r}"
    return "plain", "no contrast agent tag or contrast description"


def select(series: list[SeriesSummary], rule: SelectionRule, tasks: tuple[str, ...] = ("oar", "gtv")) -> Selection:
    """Apply the rule to a study's series (see the module docstring)."""
    notes: list[str] = []
    kinds: dict[str, list[SeriesSummary]] = {"plain": [], "contrast": []}
    for s in series:
        if s.modality != "CT":
            continue
        if s.instances < rule.min_slices:
            notes.append(f"series {s.series_uid}: {s.instances} instance(s), fewer than {rule.min_slices}: not used")
            continue
        kind, why = classify(s, rule)
        kinds[kind].append(s)
        notes.append(f"series {s.series_uid} ({s.instances} instances): {kind} CT, {why}")
    best = {k: max(v, key=lambda s: (s.instances, s.series_uid)).series_uid if v else None for k, v in kinds.items()}
    plain, contrast = best["plain"], best["contrast"]
    if plain is None and contrast is None:
        notes.append("no usable CT series in the study")
        return Selection(None, None, (), tuple(notes))
    wanted: list[str] = []
    if "oar" in tasks:
        if plain is None:
            notes.append("no plain CT: the OARs are contoured on the contrast CT")
        wanted.append("oar")
    if "gtv" in tasks:
        if contrast is None:
            notes.append("no contrast CT: the GTVs need a contrast CT and are not contoured")
        else:
            wanted.append("gtv")
    if not wanted:
        notes.append(f"nothing to contour: the configured tasks ({','.join(tasks)}) need a series this study lacks")
    return Selection(plain or contrast, contrast, tuple(wanted), tuple(notes))
