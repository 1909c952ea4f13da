"""The OpenAI-compatible HTTP server (``vtensor serve``): the top layer.

- ``protocol``: the pydantic request/response models (the OpenAPI schema);
- ``async_engine``: the engine in its own thread, behind asyncio queues
  (``submission``: what a handler holds of its requests);
- ``serving_completion`` / ``serving_chat`` (with ``serving_common``): a request
  into engine submissions, and their outputs back into responses or SSE;
- ``metrics``: the Prometheus exposition; ``errors``: OpenAI-style errors;
- ``app``: routes, the API key, the body limit and the lifespan, in FastAPI.
"""
