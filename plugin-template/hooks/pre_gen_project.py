"""Refuse a family name that cannot become a Python package and an entry-point name."""

import re
import sys

family = "{{ cookiecutter.family }}"
architectures = [a.strip() for a in "{{ cookiecutter.architectures }}".split(",") if a.strip()]

if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_ -]*", family):
    sys.exit(f"ERROR: family {family!r} must start with a letter and hold only letters, digits, '-', '_' or spaces")
if not architectures or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", a) for a in architectures):
    sys.exit(f"ERROR: architectures {architectures!r} must be comma-separated class names, e.g. MyvlmForConditionalGeneration")
