"""Drop the files the chosen kind does not use (a text-only plugin has no image preprocessor)."""

from pathlib import Path

if "{{ cookiecutter.kind }}" == "llm":
    Path("{{ cookiecutter.__package }}", "preprocess.py").unlink()
