"""vtensor.models: the Llama family in plain torch, its loader and tokenizer."""
