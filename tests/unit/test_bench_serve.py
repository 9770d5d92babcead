"""pd bench serve: the workload, the per-request figures and the summary (no deployment here;
the load generator runs against real deployments in tests/integration/test_pd_e2e.py)."""
from __future__ import annotations

import pytest

from launch.bench_serve import Result, format_table, make_workload, summarize
from pd import cli


def test_workload_is_seeded_poisson_with_the_asked_mix():
    a = make_workload(40, 4.0, 0.25, 300, 20, 8, seed=3)
    b = make_workload(40, 4.0, 0.25, 300, 20, 8, seed=3)
    assert [(r.arrival_s, r.prompt) for r in a] == [(r.arrival_s, r.prompt) for r in b]
    assert sum(r.long for r in a) == 10
    assert all(len(r.prompt) == (300 if r.long else 20) and r.max_tokens == 8 for r in a)
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(a, a[1:])]
    assert a[0].arrival_s == 0 and all(g > 0 for g in gaps)
    assert 0.1 < sum(gaps) / len(gaps) < 0.5  # mean 1/rate = 0.25 s
    assert make_workload(40, 4.0, 0.25, 300, 20, 8, seed=4)[0].prompt != a[0].prompt


@pytest.mark.parametrize("kw", [dict(n=0), dict(rate=0), dict(long_fraction=1.5), dict(max_tokens=0)])
def test_bad_workload_arguments(kw):
    args = dict(n=4, rate=1.0, long_fraction=0.5, long_tokens=10, short_tokens=5, max_tokens=4) | kw
    with pytest.raises(ValueError, match="--requests"):
        make_workload(**args)


def _res(sent, times, long=False):
    return Result(True, long, sent, token_times=list(times), text="x")


def test_per_request_figures_and_summary():
    r = _res(10.0, [10.5, 10.6, 10.8, 11.1])  # TTFT 0.5, ITL 0.1 0.2 0.3, TPOT 0.2
    assert r.ttft == pytest.approx(0.5) and r.tpot == pytest.approx(0.2)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    slow = _res(10.0, [13.0, 13.5], long=True)  # TTFT 3.0 misses a 2 s SLO
    failed = Result(False, False, 10.0, error="HTTPError")
    s = summarize([r, slow, failed], wall_s=4.0, slo_ttft_s=2.0, slo_tpot_s=0.25)
    assert s["requests"] == 3 and s["failed"] == 1 and s["slo_met"] == 1
    assert s["goodput"] == pytest.approx(0.25) and s["request_rate"] == pytest.approx(0.5)
    assert s["throughput_tok_s"] == pytest.approx(6 / 4.0)
    assert s["ttft_p50"] == pytest.approx(3.0) and s["ttft_long_p50"] == pytest.approx(3.0)
    assert s["ttft_short_p50"] == pytest.approx(0.5)
    assert s["tpot_short_p99"] == pytest.approx(0.2) and s["itl_p99"] == pytest.approx(0.5)


def test_table_has_a_ratio_column_for_pd_against_colocated():
    pd = summarize([_res(0, [0.1, 0.2])], 1.0, 1.0, 1.0)
    co = summarize([_res(0, [0.2, 0.4])], 1.0, 1.0, 1.0)
    table = format_table({"pd": pd, "colocated": co})
    assert table.splitlines()[0] == "| metric | pd | colocated | pd/colocated |"
    ttft = next(line for line in table.splitlines() if line.startswith("| TTFT p50 ms |"))
    assert ttft == "| TTFT p50 ms | 100.0 | 200.0 | 0.50 |"
    assert "pd/colocated" not in format_table({"pd": pd})


def test_unknown_mode_exit_2(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    assert cli.main(["bench", "serve", "--model", str(model), "--modes", "pd,nope"]) == 2
    assert "unknown mode 'nope'" in capsys.readouterr().err
