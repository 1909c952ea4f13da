"""The embedded default: a tiny random-weight Llama and a tokenizer trained in memory.

It lets ``vtensor generate`` run on a fresh machine with nothing downloaded.
Its weights are random, so its text is gibberish; callers say so.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .config import ModelConfig, RopeConfig
from .tokenizer import Tokenizer

EMBEDDED_NAME = "vtensor-embedded-tiny-llama"
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = """\
Serving large language models is bound by GPU memory. Each request keeps a key
and value cache that grows by one token per step. Virtual memory lets the cache
of every request stay contiguous, while physical chunks are mapped in on demand.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
Once upon a time there was a small model with random weights; it spoke nonsense,
but it spoke quickly, and its memory never leaked. 0 1 2 3 4 5 6 7 8 9 10 100.
"""


@functools.cache
def embedded_tokenizer() -> Tokenizer:
    """A byte-level BPE of ~512 tokens trained on the text above (deterministic)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    return Tokenizer(tok, bos_token="<|bos|>", eos_token="<|eos|>", chat_template=CHAT_TEMPLATE)


def embedded_config() -> ModelConfig:
    tok = embedded_tokenizer()
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=tok.vocab_size,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=2048,
        rope=RopeConfig(theta=10000.0),
        eos_token_ids=tok.eos_token_ids,
        bos_token_id=0,
    )
