"""The boxes Qwen2-VL and Qwen2.5-VL write in their answers (the ``parse_grounding`` hook).

- Qwen2-VL writes ``<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``
  in 0..1000 of the picture; several boxes may follow one reference.
- Qwen2.5-VL, asked for JSON, writes ``{"bbox_2d": [x1, y1, x2, y2], "label": "the cat"}`` in
  pixels of the picture as it saw it, i.e. after the preprocessor's resize (``smart_resize``,
  recorded as ``ImageInput.extra["resized_size"]``). It switched to absolute coordinates, so its
  ``<|box_start|>`` boxes are resized pixels too.

Both are mapped to pixels of the request's last picture (the one a grounding question is about).
"""

from __future__ import annotations

import json
import re
from typing import Any

from vlm.plugin import GroundedBox, ModelInputs, from_normalized, from_resized

_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", re.S)
_BOX = re.compile(rf"<\|box_start\|>\s*\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)\s*<\|box_end\|>")
_JSON_OBJECT = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}", re.S)

Box = tuple[float, float, float, float]


def box_token_boxes(text: str) -> list[tuple[str | None, Box]]:
    """``(label, (x1, y1, x2, y2))`` of each ``<|box_start|>`` box, as written; a box's label is
    the latest ``<|object_ref_start|>`` reference before it (``None`` without one)."""
    refs = [(match.start(), match.group(1).strip()) for match in _REF.finditer(text)]
    found = []
    for match in _BOX.finditer(text):
        earlier = [name for start, name in refs if start < match.start()]
        x1, y1, x2, y2 = (float(v) for v in match.groups())
        found.append((earlier[-1] if earlier else None, (x1, y1, x2, y2)))
    return found


def json_boxes(text: str) -> list[tuple[str | None, Box]]:
    """``(label, (x1, y1, x2, y2))`` of each JSON object with a four-number ``bbox_2d``, as
    written; malformed objects are skipped."""
    found = []
    for match in _JSON_OBJECT.finditer(text):
        try:
            item = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        coords = item.get("bbox_2d")
        if not (isinstance(coords, list) and len(coords) == 4):
            continue
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in coords):
            continue
        label = item.get("label")
        x1, y1, x2, y2 = (float(v) for v in coords)
        found.append((str(label) if label is not None else None, (x1, y1, x2, y2)))
    return found


def is_qwen2_5_vl(hf_config: Any) -> bool:
    if getattr(hf_config, "model_type", None) == "qwen2_5_vl":
        return True
    return "Qwen2_5_VLForConditionalGeneration" in (getattr(hf_config, "architectures", None) or [])


def parse_grounding(
    text: str, image_sizes: list[tuple[int, int]], hf_config: Any, model_inputs: ModelInputs
) -> list[GroundedBox]:
    """Every box in ``text``, in pixels of the request's last picture: ``<|box_start|>`` boxes
    first, then JSON ones, each in the order written. ``[]`` for a request without a picture."""
    if not image_sizes:
        return []
    size = image_sizes[-1]
    resized = model_inputs.images[-1].extra.get("resized_size") or size
    pixels = [from_resized(label, box, resized, size) for label, box in json_boxes(text)]
    if is_qwen2_5_vl(hf_config):
        tokens = [from_resized(label, box, resized, size) for label, box in box_token_boxes(text)]
    else:
        tokens = [from_normalized(label, box, size) for label, box in box_token_boxes(text)]
    return tokens + pixels
