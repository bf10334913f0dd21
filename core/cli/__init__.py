"""The ``vlmrun`` command line. Every module here imports torch lazily."""
