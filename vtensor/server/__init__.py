"""The OpenAI-compatible HTTP server (``vtensor serve``): the top layer.

- ``protocol``: the pydantic request/response models (the OpenAPI schema), whose
  strings are ``text_checks.Text`` (valid Unicode or a 400);
- ``async_engine``: the engine in its own thread, behind asyncio queues
  (``submission``: what a handler holds of its requests; ``drain``: the graceful
  shutdown's deadline);
- ``served_model``: the model's name and limits, its tokenizer on worker threads;
- ``serving_completion`` / ``serving_chat`` (with ``serving_common``): a request
  into engine submissions, and their outputs back into responses or SSE;
- ``metrics``: the Prometheus exposition; ``errors``: OpenAI-style errors;
- ``auth`` (the API key) and ``body_limit``: ASGI middlewares;
- ``app``: routes and the lifespan, in FastAPI; ``shutdown``: uvicorn's server with
  the drain and the forced exit.
"""
