"""vtensor.engine: scheduler, sampler, model runner and the ``LLM`` API."""
