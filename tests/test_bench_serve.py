"""``vtensor bench serve``: workloads, arrivals and metrics, then real runs on loopback."""

from __future__ import annotations

import itertools
import json
import random
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtensor.bench.serve import RunArgs, arrival_times
from vtensor.bench.serve_client import RequestResult
from vtensor.bench.serve_metrics import SLO, percentile, summarize
from vtensor.bench.serve_workloads import WorkloadArgs, build_workload
from vtensor.cli import main as cli

from .server_harness import Served, serve


def test_percentile_matches_numpy() -> None:
    np = pytest.importorskip("numpy", reason="numpy is the reference")
    values = [random.random() for _ in range(random.randint(1, 50))]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_arrivals_gamma_mean_and_burstiness() -> None:
    rate = random.uniform(2, 20)
    times = arrival_times(20000, RunArgs(rate, 1.0, None, random.randrange(1000)))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / rate, rel=0.1)  # exponential: sd = mean
    bursty = arrival_times(20000, RunArgs(rate, 0.25, None, 1))
    bgaps = [b - a for a, b in itertools.pairwise(bursty)]
    assert statistics.fmean(bgaps) == pytest.approx(1 / rate, rel=0.1)
    assert statistics.stdev(bgaps) > 1.5 * statistics.stdev(gaps)  # burstier, same rate
    assert arrival_times(5, RunArgs(float("inf"), 1.0, None, 0)) == [0.0] * 5


def test_workload_shapes() -> None:
    seed = random.randrange(1000)
    share = build_workload(WorkloadArgs("sharegpt-like", 4000, 32000, seed=seed))
    prompts = [len(c.turns[0]) for c in share]
    outs = [c.output_lens[0] for c in share]
    assert min(prompts) >= 4 and max(prompts) <= 1024 and min(outs) >= 4
    assert all(p + o <= 2048 for p, o in zip(prompts, outs))
    assert 170 < statistics.fmean(prompts) < 240 and 150 < statistics.fmean(outs) < 230
    assert statistics.median(prompts) < statistics.fmean(prompts)  # long-tailed
    sp = build_workload(WorkloadArgs("shared-prefix", 0, 32000, num_groups=3,
                                     prompts_per_group=4, system_len=50, seed=seed))  # fmt: skip
    prefixes = {tuple(c.turns[0][:50]) for c in sp}
    assert len(sp) == 12 and len(prefixes) == 3
    mt = build_workload(WorkloadArgs("multiturn", 0, 32000, num_clients=5, num_rounds=3,
                                     question_len=7, answer_len=2, seed=seed))  # fmt: skip
    assert [len(c.turns) for c in mt] == [3] * 5 and mt[0].output_lens == [2, 2, 2]


def test_summary_definitions() -> None:
    r = RequestResult(0, 0, 0.0, ok=True, prompt_len=10, output_len=5, ttft=0.1,
                      latency=0.5, itl=[0.1] * 4)  # fmt: skip
    bad = RequestResult(1, 0, 0.0, error="HTTP 503")
    s = summarize([r, bad], 2.0, SLO(ttft_ms=200))
    assert s["completed"] == 1 and s["failed"] == 1 and s["errors"] == ["HTTP 503"]
    assert s["mean_tpot_ms"] == pytest.approx(100.0)  # (500 - 100) / (5 - 1)
    assert s["total_token_throughput"] == pytest.approx(7.5) and s["goodput"] == 0.5


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    with serve(max_model_len=512) as s:
        yield s


def test_random_sweep_against_server(server: Served, tmp_path: Path) -> None:
    n, out_len = random.randint(6, 12), random.randint(4, 10)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = cli(["bench", "serve", "--base-url", server.url, "--num-prompts", str(n),
              "--input-len", "40", "--output-len", str(out_len), "--vocab-size", "400",
              "--request-rate", "50,inf", "--json", str(out), "--plot", str(png)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert [r["request_rate"] for r in result["runs"]] == [50.0, "inf"]
    for run in result["runs"]:
        assert run["completed"] == n and run["failed"] == 0
        assert run["total_output_tokens"] == n * out_len  # ignore_eos: exact lengths
        assert run["total_input_tokens"] == n * 40
        assert 0 < run["median_ttft_ms"] <= run["median_e2el_ms"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    server.idle_and_balanced()


def test_multiturn_prompts_grow_by_answer_and_question(server: Served, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    rc = cli(["bench", "serve", "--base-url", server.url, "--dataset", "multiturn",
              "--num-clients", "4", "--num-rounds", "3", "--question-len", "20",
              "--answer-len", "5", "--vocab-size", "400", "--request-rate", "100",
              "--max-concurrency", "2", "--json", str(out)])  # fmt: skip
    assert rc == 0
    [run] = json.loads(out.read_text())["runs"]
    assert [r["mean_prompt_len"] for r in run["per_round"]] == [20, 45, 70]
    assert all(r["requests"] == 4 for r in run["per_round"])
    server.idle_and_balanced()


def test_multiturn_reports_cached_tokens_and_compares_with_the_cache_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same multi-turn workload against a server with prefix caching and one without:
    from round 2 the history is served from the cache (whole 4-token blocks), the JSON
    keeps the server's own counts, and ``bench compare`` puts the two side by side."""
    argv = ["bench", "serve", "--dataset", "multiturn", "--num-clients", "3",
            "--num-rounds", "3", "--question-len", "20", "--answer-len", "5",
            "--vocab-size", "400", "--request-rate", "inf"]  # fmt: skip
    paths = {}
    for name, on in (("on", True), ("off", False)):
        with serve(max_model_len=512, chunk_size=4096, enable_prefix_caching=on) as s:
            paths[name] = tmp_path / f"{name}.json"
            assert cli([*argv, "--base-url", s.url, "--json", str(paths[name])]) == 0
            s.idle_and_balanced()
    on_run = json.loads(paths["on"].read_text())["runs"][0]
    off_run = json.loads(paths["off"].read_text())["runs"][0]
    cached = [r["mean_cached_tokens"] for r in on_run["per_round"]]
    assert cached[0] == 0 and cached[1] == 24 and cached[2] == 48  # (20+5-1)//4*4, ...
    assert all(r["mean_cached_tokens"] == 0 for r in off_run["per_round"])
    server = on_run["server_prefix_cache"]
    assert server["hit_tokens"] == 3 * (24 + 48) and 0 < server["hit_rate"] < 1
    assert off_run["server_prefix_cache"]["hit_tokens"] == 0
    capsys.readouterr()
    assert cli(["bench", "compare", str(paths["on"]), str(paths["off"])]) == 0
    printed = capsys.readouterr().out
    assert "req/s" in printed and "per round" in printed and "TTFT p50 on" in printed


# ------------------------------------------------------------------ the soak (issue 18)
def test_abort_points_are_mid_stream_and_seeded() -> None:
    from vtensor.bench.serve import abort_points
    from vtensor.bench.serve_workloads import Conversation

    lens = [random.randint(1, 30) for _ in range(4000)]
    convs = [Conversation([[5]], [n]) for n in lens]
    fraction, seed = random.uniform(0.1, 0.5), random.randrange(1000)
    points = [p[0] for p in abort_points(convs, RunArgs(1.0, 1.0, None, seed, fraction))]
    assert points == [p[0] for p in abort_points(convs, RunArgs(1.0, 1.0, None, seed, fraction))]
    chosen = [(p, n) for p, n in zip(points, lens) if p is not None]
    assert all(1 <= p <= n - 1 for p, n in chosen)  # after a token, before the last
    eligible = sum(n > 1 for n in lens)
    assert len(chosen) / eligible == pytest.approx(fraction, abs=0.04)
    with pytest.raises(ValueError):
        RunArgs(1.0, 1.0, None, 0, 1.0)


def _snapshot(submitted: float = 0, length: float = 0, abort: float = 0, **other: float
              ) -> dict[str, float]:  # fmt: skip
    """/metrics as parse_metrics gives it: vtensor's series that the check reads."""
    return {"vtensor_requests_submitted_total": submitted, "vtensor_requests_running": 0.0,
            "vtensor_requests_waiting": 0.0, "vtensor_kv_live_bytes": 0.0,
            "vtensor_kv_mapped_bytes": 0.0, 'vtensor_requests_finished_total{reason="stop"}': 0,
            'vtensor_requests_finished_total{reason="length"}': length,
            'vtensor_requests_finished_total{reason="abort"}': abort,
            **{f"vtensor_{k}": v for k, v in other.items()}}  # fmt: skip


def test_metrics_check_definitions() -> None:
    from vtensor.bench.serve_check import check_run, parse_metrics

    def results(n: int, aborted: int = 0) -> list[RequestResult]:
        rs = [RequestResult(i, 0, 0.0, ok=True, accepted=True, done=True) for i in range(n)]
        for r in rs[:aborted]:
            r.done, r.aborted = False, True
        return rs

    before = _snapshot(submitted=5)
    good = _snapshot(submitted=15, length=7, abort=3)
    assert all(c.ok for c in check_run(before, good, results(10, aborted=3)))
    # One request the server accepted never ended: lost, whatever the client thinks.
    lost = _snapshot(submitted=15, length=6, abort=3)
    failed = {c.name for c in check_run(before, lost, results(10, aborted=3)) if not c.ok}
    assert failed == {"lost (submitted - ended - running - waiting)"}
    # A stream the client did not leave, cut without [DONE]; KV still live.
    cut = results(10, aborted=3)
    cut[5].done = False
    live = _snapshot(submitted=15, length=7, abort=3, kv_live_bytes=4096.0)
    failed = {c.name for c in check_run(before, live, cut) if not c.ok}
    assert failed == {"streams cut short (client)", "kv_live_bytes after the run"}
    text = 'vtensor_requests_finished_total{reason="abort"} 3\nvtensor_kv_live_bytes 0\n'
    assert parse_metrics(text) == {'vtensor_requests_finished_total{reason="abort"}': 3.0,
                                   "vtensor_kv_live_bytes": 0.0}  # fmt: skip


def test_soak_with_disconnects_passes_the_metrics_check(server: Served, tmp_path: Path) -> None:
    n = random.randint(30, 50)
    out, seed = tmp_path / "soak.json", str(random.randrange(1000))
    rc = cli(["bench", "serve", "--base-url", server.url, "--num-prompts", str(n),
              "--input-len", "12", "--output-len", "16", "--range-ratio", "0.5",
              "--vocab-size", "400", "--max-concurrency", "8", "--abort-fraction", "0.4",
              "--check-metrics", "--seed", seed, "--json", str(out)])  # fmt: skip
    assert rc == 0
    [run] = json.loads(out.read_text())["runs"]
    check = run["check"]
    assert check["ok"], check
    assert run["completed"] + run["aborted"] == n and run["failed"] == 0
    assert 0 < run["aborted"] < n and check["client_aborted"] == run["aborted"]
    assert check["submitted"] == n and sum(check["finished"].values()) == n
    assert 0 < check["finished"]["abort"] <= run["aborted"]  # some finished before the drop
    server.idle_and_balanced()


def test_metrics_check_fails_while_a_request_is_left_running(
    server: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a check that cannot fail: a stream opened beside the bench and still running
    when the bench reads /metrics is a live request with live KV."""
    import requests

    body = {"prompt": [5, 6, 7], "max_tokens": 400, "stream": True, "ignore_eos": True}
    with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        rc = cli(["bench", "serve", "--base-url", server.url, "--num-prompts", "4",
                  "--input-len", "8", "--output-len", "4", "--vocab-size", "400",
                  "--check-metrics", "--check-timeout", "0.5"])  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert "metrics check FAILED" in err and "requests still running" in err
    assert "kv_live_bytes after the run" in err
    server.idle_and_balanced()
