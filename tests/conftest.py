"""Core tests. The shared fixtures (tiny_models, tiny_qwen2) come from vlm.testing.pytest_plugin,
which vlm-core registers as a pytest plugin, so plugin test suites get them too."""
