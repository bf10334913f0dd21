"""The engine: requests in, tokens out. Scheduling, KV-cache blocks, the model runner, sampling."""
