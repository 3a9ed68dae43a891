"""The kept texts of an output row with their sources and scores, for training views.

An output row stores the kept captions and their sources; their scores sit in the web and
synthetic score columns. This pairs them up again, so views never recompute a decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from capfilt.scoring.selection import WEB


@dataclass(frozen=True)
class KeptText:
    caption: str
    source: str  # "web" | "synthetic"
    itm: float | None
    itc: float | None


def kept_texts(row: dict) -> list[KeptText]:
    """The row's kept texts in kept order (for a ranking policy, best first)."""
    synthetic = list(zip(row.get("synthetic_captions") or [], row.get("synthetic_itm") or [],
                         row.get("synthetic_itc") or []))
    # A caption a guard set aside was never a candidate: a kept copy of its text is another one.
    reasons = row.get("synthetic_guard") or []
    used: set[int] = {i for i, reason in enumerate(reasons) if reason is not None}
    found = []
    for caption, source in zip(row.get("kept_captions") or [], row.get("kept_sources") or []):
        if source == WEB:
            found.append(KeptText(caption, source, row.get("web_itm"), row.get("web_itc")))
            continue
        # The same sampled caption can occur twice; each kept copy takes its own scores.
        index = next((i for i, (text, _, _) in enumerate(synthetic)
                      if text == caption and i not in used), None)
        if index is None:
            found.append(KeptText(caption, source, None, None))
            continue
        used.add(index)
        found.append(KeptText(caption, source, synthetic[index][1], synthetic[index][2]))
    return found
