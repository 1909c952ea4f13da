"""The OpenAI-compatible HTTP server (``vtensor serve``): the top layer.

``protocol`` holds the pydantic request/response models, ``async_engine`` runs
the engine in its own thread behind asyncio queues, ``openai_api`` turns
requests into engine submissions and back, and ``app`` wires the routes,
authentication, limits and errors into a FastAPI application.
"""
