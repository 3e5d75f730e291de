"""inspect and sweep on the tiny model: numbers against the Sampler and the metrics, reproducibility, plots."""

from __future__ import annotations

import csv
import io

import rich.cells
import json

import pytest
import torch

from llmsample import lab, metrics
from llmsample.config import SamplingConfig
from llmsample.sampling import Sampler

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def model_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu"]


def test_inspect_json_matches_the_sampler(cli, model_args, tiny_lm):
    model, tok = tiny_lm
    code, out, err = cli("inspect", "The quick", *model_args, "--temperature", "0.5", "--temperature", "2.0",
                         "--top-p", "0.8", "--steps", "2", "--top", "5", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert [v["label"] for v in result["steps"][0]["variants"]] == ["temperature=0.5", "temperature=2.0"]
    ids = tok("The quick", return_tensors="pt").input_ids
    for step in result["steps"]:
        with torch.no_grad():
            logits = model(ids).logits[:, -1]
        for variant, t in zip(step["variants"], (0.5, 2.0)):
            processed = Sampler(SamplingConfig(do_sample=True, temperature=t, top_p=0.8)).process(ids, logits)
            probs = torch.softmax(processed, -1)[0]
            assert variant["kept"] == int(torch.isfinite(processed).sum())
            top = torch.topk(probs, 5)
            assert [c["token_id"] for c in variant["top"]] == top.indices.tolist()[: len(variant["top"])]
            assert variant["top"][0]["prob"] == pytest.approx(float(top.values[0]), abs=1e-6)
            kept_probs = probs[torch.isfinite(processed[0])].tolist()
            assert variant["entropy"] == pytest.approx(metrics.entropy(kept_probs), abs=1e-5)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)  # greedy path
    assert result["steps"][1]["context"] == tok.decode(ids[0, -2:-1])


def test_inspect_flags_where_temperature_order_changes_the_kept_set(cli, model_args):
    code, out, _ = cli("inspect", "The quick", *model_args, "--temperature", "0.2", "--top-p", "0.9",
                       "--format", "json")
    variant = json.loads(out)["steps"][0]["variants"][0]
    assert variant["order_sensitive"] is not None
    assert variant["order_sensitive"]["temperature_first"] < variant["order_sensitive"]["temperature_last"]


def test_inspect_text_shows_bars_entropy_and_differences(cli, model_args):
    code, out, err = cli("inspect", "The quick", *model_args, "--preset", "technical", "--preset", "poetry",
                         "--top", "4")
    assert code == 0, err
    assert "technical" in out and "poetry" in out and "█" in out and "entropy" in out
    assert "kept sets differ" in out


def test_inspect_plot_is_a_png(cli, model_args, tmp_path):
    path = tmp_path / "dist.png"
    code, _, err = cli("inspect", "The quick", *model_args, "--temperature", "0.9", "--temperature", "0.1",
                       "--plot", str(path))
    assert code == 0, err
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_mismatched_repeats_are_refused(cli, model_args):
    code, _, err = cli("inspect", "x", *model_args, "--temperature", "0.1", "--temperature", "0.2",
                       "--top-p", "0.1", "--top-p", "0.2", "--top-p", "0.3")
    assert code == 2 and "is given" in err and "same number of times" in err


def test_sweep_is_reproducible_and_its_metrics_are_the_samples(cli, model_args, monkeypatch):
    args = ["sweep", "The quick", *model_args, "--grid", "top_p=0.3,0.95", "--grid", "temperature=1.5",
            "--samples", "3", "--max-new-tokens", "8", "--seed", "4", "--format", "json"]
    first, second = cli(*args), cli(*args)
    assert first[0] == 0, first[2]
    assert json.loads(first[1]) == json.loads(second[1])
    points = json.loads(first[1])["points"]
    assert [p["point"] for p in points] == [{"top_p": 0.3, "temperature": 1.5}, {"top_p": 0.95, "temperature": 1.5}]
    for p in points:
        assert 0 < p["distinct_1"] <= 1 and 0 <= p["repeated_3gram_rate"] <= 1 and p["perplexity"] >= 1
        assert p["chain"] == "logits -> top_p -> temperature -> dist"
    assert points[0]["mean_entropy"] < points[1]["mean_entropy"]  # a smaller nucleus leaves less uncertainty

    # the same numbers, recomputed from the samples the sweep generated
    seen = {}
    real = lab.point_metrics

    def spy(samples, logprobs, entropies):
        seen.setdefault("samples", []).append(samples)
        return real(samples, logprobs, entropies)

    monkeypatch.setattr(lab, "point_metrics", spy)
    cli(*args)
    for p, samples in zip(points, seen["samples"]):
        assert p["distinct_2"] == pytest.approx(metrics.distinct_n(samples, 2))
        assert p["mean_length"] == pytest.approx(sum(map(len, samples)) / len(samples))


def test_sweep_csv_and_plot(cli, model_args, tmp_path):
    path = tmp_path / "sweep.png"
    code, out, err = cli("sweep", "The quick", *model_args, "--grid", "temperature=0.5,1.0,1.5", "--samples", "2",
                         "--max-new-tokens", "6", "--format", "csv", "--plot", str(path))
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["temperature"] for r in rows] == ["0.5", "1.0", "1.5"]
    assert {"distinct_1", "distinct_2", "repeated_3gram_rate", "mean_entropy", "perplexity"} <= set(rows[0])
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_sweep_text_table_keeps_every_column_in_80_columns_with_long_samples():
    from llmsample import render

    row = {"distinct_1": 0.61, "distinct_2": 0.92, "repeated_3gram_rate": 0.0, "mean_entropy": 1.13,
           "perplexity": 3.25, "mean_length": 16.0}
    rows = [dict(row, point={"top_p": 0.5, "temperature": 0.7}, sample=" the sea " * 30),
            dict(row, point={"top_p": 0.9, "temperature": 0.7}, sample="今天天气非常好" * 20)]
    out, _ = render.make_consoles(no_color=True, stdout=io.StringIO())
    out.width = 80
    out.print(render.sweep_table(rows, {"top_p": [0.5, 0.9], "temperature": [0.7]}))
    lines = out.file.getvalue().splitlines()
    assert all(rich.cells.cell_len(line) <= 80 for line in lines[:4])
    header, _, first, second = lines[:4]
    assert header.split()[:9] == ["top_p", "┃", "temperature", "┃", "dist-1", "┃", "dist-2", "┃", "rep-3"]
    assert "ppl" in header and "len" in header and header.endswith("first s…")  # tight: the header is cut too
    assert first.split("│")[:2] == ["  0.5 ", "         0.7 "] and "3.2" in first and first.endswith("…")
    assert second.split("│")[0].strip() == "0.9" and "今天" in second and second.endswith("…")


@pytest.mark.parametrize(
    "grid, message",
    [
        ("top_p", "--grid takes NAME=V1,V2,…"),
        ("top_q=0.1", "'top_q' is not a sweepable setting"),
        ("top_p=0.1,x", "--grid top_p: 'x' is not a number"),
        ("top_p=0.1,1.5", "--top-p must be in (0, 1], got 1.5"),
    ],
)
def test_bad_grids_exit_2(cli, model_args, grid, message):
    code, out, err = cli("sweep", "x", *model_args, "--grid", grid)
    assert code == 2 and out == "" and message in err


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch):
    import builtins

    from llmsample import plots

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(plots.ConfigError, match=r"--plot needs matplotlib: pip install 'llmsample\[plot\]'"):
        plots.inspect_plot({"prompt": "", "steps": []}, "x.png")
