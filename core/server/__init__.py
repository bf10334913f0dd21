"""The OpenAI-compatible HTTP server behind ``vlmrun serve``.

- :mod:`vlm.server.app`: the FastAPI application (``create_app``): routes and the steps of a request.
- :mod:`vlm.server.async_engine`: :class:`AsyncEngine` runs one ``LLMEngine`` in its own thread
  and streams outputs to asyncio handlers.
- :mod:`vlm.server.protocol`: pydantic request / response models of the OpenAI API.
- :mod:`vlm.server.errors`: OpenAI error bodies, and how refusals and failures become them.
- :mod:`vlm.server.prompts`: chat messages (images under the media policy and limits: download
  deadline and size, pixels per request and in flight) or a prompt -> ``ModelInputs``.
- :mod:`vlm.server.sampling`: a request's sampling fields -> ``SamplingParams``.
- :mod:`vlm.server.logprobs`: logprobs in chat and completions format, with token texts and bytes.
- :mod:`vlm.server.streaming`: streamed responses as server-sent events.
- :mod:`vlm.server.disconnect`: aborting the request of a client that went away.
- :mod:`vlm.server.metrics`: Prometheus metrics for ``GET /metrics``.

Importing this package imports nothing heavy; the submodules import FastAPI and torch.
"""
