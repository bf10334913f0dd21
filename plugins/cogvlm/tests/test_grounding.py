"""CogVLM's grounding format through the plugin's ``parse_grounding`` hook: ``[[x0,y0,x1,y1]]`` in
0..999 of the picture, several boxes of one phrase separated by ``;``, in pixels of the original picture."""

from __future__ import annotations

import pytest

from vlm.plugin.manager import get_registry


@pytest.fixture(scope="module")
def parse():
    hook = get_registry().hook_of("cogvlm", "parse_grounding")
    # as the engine calls it: keyword arguments, the ones this plugin does not read included
    return lambda text, image_sizes: hook(text=text, image_sizes=image_sizes, hf_config=None, model_inputs=None)


def test_boxes_in_pixels_of_the_original_picture(parse):
    answer = "The bus[[100,200,300,400]] is next to two dogs[[0,0,500,999;500,500,600,600]]."
    boxes = parse(text=answer, image_sizes=[(2000, 1000)])
    assert [b.label for b in boxes] == ["The bus", "is next to two dogs", "is next to two dogs"]
    assert [b.box for b in boxes] == [
        (200.0, 200.0, 600.0, 400.0),
        (0.0, 0.0, 1000.0, 999.0),
        (1000.0, 500.0, 1200.0, 600.0),
    ]
    assert {b.space for b in boxes} == {"pixels"}


def test_malformed_boxes_and_no_picture(parse):
    assert parse(text="a[[1,2,3]] b[[x,1,2,3]] c[[1,2,3,4,5]]", image_sizes=[(100, 100)]) == []
    assert parse(text="a dog[[1,2,3,4]]", image_sizes=[]) == []
    (box,) = parse(text="Where? [[10, 20, 30, 40]]", image_sizes=[(1000, 1000)])
    assert box.label is None and box.box == (10.0, 20.0, 30.0, 40.0)
