"""The boxes InternVL writes in its answers (the ``parse_grounding`` hook).

InternVL names an object and its boxes as ``<ref>the cat</ref><box>[[x1, y1, x2, y2]]</box>``, in
0..1000 of the picture; one reference may have several boxes (``[[..], [..]]``), and a box may come
without a reference. The markers are special tokens in the real tokenizers, which is why the hook
reads the answer decoded with special tokens kept.
"""

from __future__ import annotations

import re

from vlm.plugin import GroundedBox, from_normalized

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_REF = re.compile(r"<ref>(.*?)</ref>", re.S)
_BOX = re.compile(r"<box>(.*?)</box>", re.S)
_COORDS = re.compile(rf"\[{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}\]")

Box = tuple[float, float, float, float]


def internvl_boxes(text: str) -> list[tuple[str | None, Box]]:
    """``(label, (x1, y1, x2, y2))`` of each box, as written (0..1000); lists that are not four
    numbers are skipped. A box's label is the reference right before it, with nothing but other
    boxes and spaces between them (``None`` otherwise)."""
    found = []
    for match in _BOX.finditer(text):
        refs = list(_REF.finditer(text, 0, match.start()))
        between = _BOX.sub("", text[refs[-1].end() : match.start()]) if refs else "no reference"
        label = refs[-1].group(1).strip() if not between.strip() else None
        for coords in _COORDS.finditer(match.group(1)):
            x1, y1, x2, y2 = (float(v) for v in coords.groups())
            found.append((label, (x1, y1, x2, y2)))
    return found


def parse_grounding(text: str, image_sizes: list[tuple[int, int]]) -> list[GroundedBox]:
    """Every box in ``text``, in pixels of the request's last picture, in the order written;
    ``[]`` for a request without a picture."""
    if not image_sizes:
        return []
    return [from_normalized(label, box, image_sizes[-1]) for label, box in internvl_boxes(text)]
