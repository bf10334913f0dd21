"""The OpenAI-compatible HTTP server behind ``vlmrun serve``.

- :mod:`vlm.server.async_engine`: :class:`AsyncEngine` runs one ``LLMEngine`` in its own thread
  and streams outputs to asyncio handlers.
- :mod:`vlm.server.protocol`: pydantic request / response models of the OpenAI API.
- :mod:`vlm.server.app`: the FastAPI application (``create_app``).
- :mod:`vlm.server.metrics`: Prometheus metrics for ``GET /metrics``.

Importing this package imports nothing heavy; the submodules import FastAPI and torch.
"""
