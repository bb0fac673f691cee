"""What the SR says about the series it assessed: description, number and contrast family."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydicom import Dataset

from .data import header_view
from .result import SeriesReport

__all__ = ["CONTRAST_FAMILIES", "contrast_family", "describe_series"]

CONTRAST_FAMILIES = ("T1", "T1 post-contrast", "T2", "FLAIR", "PD", "unknown")

# Checked in this order on SeriesDescription (and SequenceName); the first that matches decides.
_FAMILIES = (
    ("T1", re.compile(r"t1[\W_]*(flair|ir\b)", re.I)),  # T1 FLAIR is T1-weighted
    ("FLAIR", re.compile(r"flair|dark[\W_]*fluid", re.I)),
    ("PD", re.compile(r"(^|[\W_])pd([\W_]|w|$)|proton[\W_]*dens", re.I)),
    ("T2", re.compile(r"t2|tse[\W_]*t2|\bhaste\b", re.I)),
    ("T1", re.compile(r"t1|mp[\W_]*rage|spgr|bravo|tfl3d|\bvibe\b|flash|\bmpr\b", re.I)),
)
_POST_CONTRAST = re.compile(r"post(?!erior|[\W_]*op)|gad|(^|[\W_])gd([\W_]|$)|\+\s*c\b|\bc\+|contrast"
                            r"|(^|[\W_])(km|ce|mdc)([\W_]|$)|enhanc", re.I)
_PRE_CONTRAST = re.compile(r"(^|[\W_])(pre|pr[eé]?[\W_]*contrast|nativ|native|w/?o|without|non|no|ohne|nc)"
                           r"([\W_]|$)", re.I)


def contrast_family(ds: Dataset) -> str:
    """The contrast family of a series from its header: one of ``CONTRAST_FAMILIES``.

    T1 post-contrast: a T1 series (or one whose description names only a contrast agent, e.g.
    "AX POST GAD") whose description says post-contrast, or that carries a ContrastBolusAgent,
    unless the description says pre-contrast.
    """
    view = header_view(ds)
    texts = [str(view.get(k) or "") for k in ("SeriesDescription", "ProtocolName", "SequenceName")]
    # the series' own description decides; the protocol (often the whole exam's name, e.g. "BRAIN
    # W/WO CONTRAST") and the sequence name only when the description names no family
    family = next((name for text in texts for name, pattern in _FAMILIES if pattern.search(text)), "unknown")
    description = texts[0]
    pre = bool(_PRE_CONTRAST.search(description))
    post_words = bool(_POST_CONTRAST.search(description)) and not pre
    agent = bool(str(view.get("ContrastBolusAgent") or "").strip()) and not pre
    if (family == "T1" and (post_words or agent)) or (family == "unknown" and post_words):
        return "T1 post-contrast"
    return family


def describe_series(datasets: Sequence[Dataset]) -> SeriesReport:
    """Description, number and contrast family of a series (from its first dataset)."""
    first = header_view(datasets[0])
    return SeriesReport(
        description=" ".join(str(first.get("SeriesDescription") or "").split()),
        number=str(first.get("SeriesNumber") or "").strip(),
        contrast=contrast_family(datasets[0]),
    )
