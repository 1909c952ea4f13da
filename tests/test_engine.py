"""The engine end to end on the embedded model (CPU): stops, sampling, bad input, CLI."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoints import make_checkpoint
from vtensor import SamplingParams
from vtensor.cli import main as cli_main
from vtensor.engine.config import DeviceUnavailableError, EngineConfig
from vtensor.engine.input_processor import RequestError
from vtensor.engine.llm_engine import LLMEngine


def greedy(llm, prompt, n: int = 12, **kw):
    return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, **kw))[0].outputs[0]


def test_stop_token_ids_eos_and_max_tokens(make_llm) -> None:
    llm = make_llm()
    prompt = [random.randrange(4, 400) for _ in range(random.randint(3, 30))]
    # The model's own EOS (id 1) ends about 1 random prompt in 80 before 12 tokens, so
    # the reference ignores it; the EOS check below swaps in a token it surely emits.
    full = greedy(llm, prompt, ignore_eos=True)
    assert len(full.token_ids) == 12 and full.finish_reason == "length"
    stop_at = full.token_ids[4]
    first = full.token_ids.index(stop_at)
    cut = greedy(llm, prompt, stop_token_ids=[stop_at], ignore_eos=True)
    assert cut.token_ids == full.token_ids[: first + 1]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop_at)
    llm.engine.outputs.eos_token_ids = (stop_at,)
    eos = greedy(llm, prompt)
    assert eos.token_ids == full.token_ids[: first + 1] and eos.stop_reason is None
    assert greedy(llm, prompt, ignore_eos=True).token_ids == full.token_ids


def test_stop_strings_cut_the_text(make_llm) -> None:
    llm = make_llm()
    full = greedy(llm, "Hello world", n=16)
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        stop = text[-3:]
    out = greedy(llm, "Hello world", n=16, stop=[stop])
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = greedy(llm, "Hello world", n=16, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == text[: text.index(stop) + len(stop)]


def test_prompt_plus_max_tokens_over_the_context_is_refused(make_llm) -> None:
    """The request contract's length rule (the HTTP side: test_server_robust): refuse,
    never trim; max_tokens=None fills the context."""
    llm = make_llm(max_model_len=40)
    prompt = list(range(5, 35))  # 30 tokens: room for 10
    with pytest.raises(RequestError, match="max_tokens=11 exceeds max_model_len=40") as err:
        llm.generate([[5, 6], prompt], SamplingParams(max_tokens=11))
    assert err.value.param == "max_tokens" and not llm.engine.requests  # nothing queued
    exact = greedy(llm, prompt, n=10, ignore_eos=True)
    assert len(exact.token_ids) == 10 and exact.finish_reason == "length"
    fill = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    assert llm.generate([prompt], fill)[0].outputs[0].token_ids == exact.token_ids


def test_seeds_reproduce_and_n_samples_differ(make_llm) -> None:
    llm = make_llm()
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=random.randrange(1000), n=3)
    a = llm.generate(["Once upon a time"], params)[0]
    b = llm.generate(["Once upon a time", "Hello"], params)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
    # ignore_eos: random weights sample EOS now and then, which would end a row early.
    unseeded = SamplingParams(
        max_tokens=16, temperature=1.0, top_k=50, top_p=0.9, min_p=0.01, ignore_eos=True
    )
    outs = llm.generate(["x"] * 4, unseeded)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)


def test_bad_input_raises_and_queues_nothing(make_llm, tmp_path: Path) -> None:
    llm = make_llm(max_model_len=64)
    cases = [
        (list(range(64)), "no room to generate"),
        ([], "empty"),
        ([10**6], "token ids must be in"),
        (5, "not a mix"),  # a stray id beside text prompts
    ]
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            llm.generate(["fine prompt", prompt], SamplingParams(max_tokens=4))
        assert not llm.engine.has_unfinished() and not llm.engine.requests
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"stop": [""]}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="not both"):
        EngineConfig(model="x", shape="llama3-8b")
    make_checkpoint(tmp_path, "llama")
    (tmp_path / "tokenizer.json").unlink()
    no_tok = make_llm(str(tmp_path))
    with pytest.raises(ValueError, match="no tokenizer"):
        no_tok.generate("text")
    assert len(greedy(no_tok, [5, 6, 7], n=3).token_ids) == 3  # token ids still work


def test_request_larger_than_the_pool_is_refused(make_llm) -> None:
    llm = make_llm(chunk_size=4096, kv_cache_bytes=4 * 4096)  # 1 KiB/token: 4 tokens/chunk
    # 3 chunks of 4 tokens: a request may hold 12 tokens (prompt + output), no more.
    assert llm.engine.inputs.max_request_len == 12
    with pytest.raises(ValueError, match="max_model_len=12: the most tokens the KV pool"):
        llm.generate([list(range(5, 20))], SamplingParams(max_tokens=8))
    assert len(greedy(llm, [5, 6], n=4).token_ids) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the no-GPU error path")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(capsys) -> None:
    with pytest.raises(DeviceUnavailableError, match="no GPU"):
        LLMEngine(EngineConfig(device="cuda"))
    assert cli_main(["generate", "--device", "cuda"]) == 2
    assert "no GPU" in capsys.readouterr().err


def test_abort_returns_the_slot_and_chat_renders_the_template(make_llm) -> None:
    llm = make_llm()
    engine = llm.engine
    [rid] = engine.add_request("Hello", SamplingParams(max_tokens=50))
    engine.step()
    engine.abort(rid)
    assert engine.requests[rid].finish_reason == "abort" and not engine.has_unfinished()
    assert engine.kv.usage().running_slots == 0
    engine.pop(rid)
    # ignore_eos: a random draw may be EOS. One full-suite run got 2 tokens here, not
    # reproduced in 600 runs of this sequence; without EOS a lost token still fails.
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    out = llm.chat([{"role": "user", "content": "hi"}], params)[0]
    assert out.prompt.startswith("<|im_start|>user\nhi<|im_end|>")
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"


def test_cli_generate_runs_the_embedded_default(capsys) -> None:
    assert cli_main(["generate", "--prompt", "Hello", "--max-tokens", "5", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "random weights" in captured.err and "Completion:" in captured.out
    assert "(5 tokens, finish: length)" in captured.out


def test_cli_bench_offline_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--num-prompts", "6", "--input-len", "20", "--output-len", "5",
            "--decode-batches", "1,2", "--decode-ctx", "16", "--decode-steps", "2",
            "--device", "cpu", "--attention-backend", "torch", "--no-hf-peer",
            "--json", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    import json

    data = json.loads(out.read_text())
    assert data["throughput"][0]["num_prompts"] == 6 and len(data["decode"]) == 2
    assert data["attention_backend"] == "torch"


def spy_num_decode(llm: Any) -> list[int]:
    """``num_decode`` of each eager non-decode step, recorded from now on (graph replays
    do not call Python). ``del llm.engine.runner.attn.attend`` removes the spy. Every
    model path (``forward``, or ``rope_store`` then ``attend``) attends through it."""
    seen: list[int] = []
    attend = llm.engine.runner.attn.attend

    def spy(layer, q, meta):  # type: ignore[no-untyped-def]
        if layer == 0 and not meta.is_decode:
            seen.append(meta.num_decode)
        return attend(layer, q, meta)

    llm.engine.runner.attn.attend = spy
    return seen


def test_mixed_steps_send_decodes_to_the_decode_kernel(make_llm) -> None:
    """The runner puts a mixed batch's decode rows first and marks them; the output must
    not change (greedy, against the same prompts run one at a time)."""
    llm = make_llm(max_num_batched_tokens=24)
    seen = spy_num_decode(llm)
    vocab = llm.engine.model_config.vocab_size
    prompts = [
        [random.randrange(2, vocab) for _ in range(random.randint(30, 60))] for _ in range(3)
    ]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert any(n > 0 for n in seen), f"no mixed step was split: {seen}"
    del llm.engine.runner.attn.attend  # the spy shadows the method on the instance
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert together == alone


def test_cuda_device_gets_an_explicit_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--device cuda` resolves to the current GPU's index: torch.cuda.set_device (each
    rank's setup) rejects a CUDA device without one (torch 2.11 on the H100)."""
    from vtensor.engine.setup import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device(None) == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
