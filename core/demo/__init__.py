"""The bundled demo: a tiny InternVL-layout model that answers questions about generated shapes.

``vlm.demo.shapes`` draws the pictures and writes the questions and answers; the checkpoint lives
in ``core/demo/internvl-shapes`` (package data of ``vlm.demo``, so an installed vlm-core has it) and is trained by ``scripts/train_demo.py``.
"""
