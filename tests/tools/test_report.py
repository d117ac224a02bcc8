"""kiln.tools.report on hand-written workdirs: table order, exact numbers, unfinished runs, PNGs."""

import json
import math

import matplotlib.image
import pytest

from kiln.errors import KilnError
from kiln.tools import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(path, summary=None, losses=(6.0, 5.0, 4.0), vals=(500.0, 300.0), task=None):
    """A run folder: metrics.jsonl (train/loss per step, validation/perplexity at 0 and the
    end) and, when `summary` is given, summary.json."""
    path.mkdir(parents=True)
    rows = [{"step": 0, "validation/perplexity": vals[0], "validation/loss": math.log(vals[0])}]
    rows += [{"step": i + 1, "train/loss": loss} for i, loss in enumerate(losses)]
    if summary is not None:
        rows.append({"step": len(losses), "validation/perplexity": vals[-1]})
        full = {"step": len(losses), "parameters": 1234, **summary}
        if task:
            full["task"] = task
        (path / "summary.json").write_text(json.dumps(full))
    (path / "config.json").write_text("{}")
    with open(path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def lm_summary(ppl):
    return {
        "validation/perplexity": ppl,
        "validation/loss": math.log(ppl),
        "validation/accuracy": 1 / ppl,
        "validation/tokens": 244.0,
        "test/perplexity": ppl * 0.9,
        "test/loss": math.log(ppl * 0.9),
        "test/accuracy": 1.1 / ppl,
    }


# Perplexities with more digits than a 4- or 6-digit format keeps.
PPL = {
    "lr=0.0001_seed=0": 535.123456789,
    "lr=0.001_seed=0": 123.456789012,
    "lr=0.01_seed=0": 2.71828182846,
}


def sweep_dir(tmp_path):
    """A sweep of 4 points over optim.lr: three finished, one (lr=0.1) interrupted."""
    points = []
    for lr in (1e-4, 1e-3, 1e-2, 1e-1):
        overrides = {"optim.lr": lr, "seed": 0}
        name = f"lr={lr!r}_seed=0"
        points.append({"name": name, "overrides": overrides})
        summary = lm_summary(PPL[name]) if name in PPL else None
        write_run(tmp_path / name, summary, losses=(6.0, 5.0 - lr, 4.0 - lr))
    record = {"config": "experiments/x.py:size=tiny", "overrides": {}, "points": points}
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    return tmp_path


def parse_table(text):
    """The markdown table of report.md: (header, rows of cells)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert set(lines[1]) <= set("|-"), lines[1]
    return cells[0], cells[2:]


def check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0, path


def summaries(root, header, rows):
    return {row[0]: json.loads((root / row[0] / "summary.json").read_text()) for row in rows}


def assert_numbers_match(header, rows, summaries):
    """Every metric cell equals the run's summary.json within 1e-6 relative (empty: absent)."""
    checked = 0
    for row in rows:
        if row[0] not in summaries:
            continue
        for key, cell in zip(header, row):
            if "/" in key and cell == "":
                assert key not in summaries[row[0]], (row[0], key)
            elif "/" in key:
                value = summaries[row[0]][key]
                assert math.isclose(float(cell), value, rel_tol=1e-6), (row[0], key, cell, value)
                checked += 1
    assert checked > 0


def test_sweep_report_sorted_best_first_with_exact_numbers(tmp_path, capsys):
    root = sweep_dir(tmp_path)
    assert report.main([str(root)]) == 0
    out = capsys.readouterr().out
    assert f"Wrote {root / 'report.md'}" in out and "3 plots" in out
    text = (root / "report.md").read_text()
    header, rows = parse_table(text)
    assert header[:4] == ["run", "optim.lr", "seed", "validation/perplexity"]
    assert header[4] == "test/perplexity" and header[-1] == "step"
    assert "validation/tokens" not in header  # counts are not metrics
    assert "validation/loss" not in header  # perplexity already says it
    assert [row[0] for row in rows] == [
        "lr=0.01_seed=0",
        "lr=0.001_seed=0",
        "lr=0.0001_seed=0",
        "lr=0.1_seed=0",
    ]
    assert [row[1] for row in rows] == ["0.01", "0.001", "0.0001", "0.1"]
    assert rows[-1][-1] == "unfinished (at step 3)" and rows[-1][3] == ""
    assert all(row[-1] == "3" for row in rows[:3])
    assert_numbers_match(
        header, rows, {n: json.loads((root / n / "summary.json").read_text()) for n in PPL}
    )
    assert "best: lr=0.01_seed=0" in text and "lower is better" in text
    for name in ("loss", "validation", "optim.lr"):
        assert f"(plots/{name}.png)" in text
        check_png(root / "plots" / f"{name}.png")
    assert not (root / "plots" / "seed.png").exists()  # one value: nothing to plot against


def test_direction_and_metric_flags(tmp_path, capsys):
    root = sweep_dir(tmp_path)
    assert report.main([str(root), "--higher-is-better"]) == 0
    _, rows = parse_table((root / "report.md").read_text())
    assert [row[0] for row in rows][:3] == ["lr=0.0001_seed=0", "lr=0.001_seed=0", "lr=0.01_seed=0"]
    assert rows[-1][0] == "lr=0.1_seed=0"  # unfinished stays last
    # accuracy = 1 / perplexity: higher is better by default, same order as perplexity.
    assert report.main([str(root), "--metric", "accuracy"]) == 0
    header, rows = parse_table((root / "report.md").read_text())
    assert header[3:5] == ["validation/accuracy", "test/accuracy"]
    assert [row[0] for row in rows][:3] == ["lr=0.01_seed=0", "lr=0.001_seed=0", "lr=0.0001_seed=0"]
    assert report.main([str(root), "--metric", "validation/accuracy", "--lower-is-better"]) == 0
    _, rows = parse_table((root / "report.md").read_text())
    assert [row[0] for row in rows][:3] == ["lr=0.0001_seed=0", "lr=0.001_seed=0", "lr=0.01_seed=0"]
    capsys.readouterr()
    assert report.main([str(root), "--metric", "validation/tokens"]) == 2
    assert "--lower-is-better or --higher-is-better" in capsys.readouterr().err
    assert report.main([str(root), "--metric", "bleu"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("kiln.tools.report: error: --metric bleu") and "validation/perplexity" in err
    )


def test_pipeline_dir(tmp_path):
    """Stages ordered by the select metric (higher accuracy first); pre-training after them."""
    stages = {"pretrain": None, "finetune": 0.523456789, "scratch": 0.392123456}
    for name, acc in stages.items():
        if acc is None:
            write_run(tmp_path / name, lm_summary(80.0))
        else:
            summary = {
                "validation/accuracy": acc,
                "test/accuracy": acc - 0.01,
                "validation/macro_f1": acc / 2,
                "test/macro_f1": acc / 2 - 0.01,
                "validation/perplexity": 3.0,
                "validation/examples": 4000,
            }
            write_run(tmp_path / name, summary, task="wn_lexname")
    comparison = {"select": "accuracy", "stages": {n: {} for n in stages}, "arms": {}}
    (tmp_path / "comparison.json").write_text(json.dumps(comparison))
    report_path, written, _ = report.write_report(str(tmp_path))
    header, rows = parse_table(open(report_path).read())
    assert header[:3] == ["stage", "validation/accuracy", "test/accuracy"]
    assert [row[0] for row in rows] == ["finetune", "scratch", "pretrain"]
    assert_numbers_match(header, rows, summaries(tmp_path, header, rows))
    assert sorted(p.rsplit("/", 1)[1] for p in written) == ["loss.png", "validation.png"]
    for path in written:
        check_png(tmp_path / "plots" / path.rsplit("/", 1)[1])


def test_pipeline_without_comparison_lists_unfinished_stage(tmp_path):
    write_run(tmp_path / "pretrain", lm_summary(90.0))
    write_run(tmp_path / "finetune", None)  # interrupted: config.json and metrics only
    _, _, markdown = report.write_report(str(tmp_path))
    header, rows = parse_table(markdown)
    assert [row[0] for row in rows] == ["pretrain", "finetune"]
    assert rows[1][-1] == "unfinished (at step 3)"
    assert header[1] == "validation/perplexity" and float(rows[0][1]) == 90.0


def test_single_run_dir(tmp_path):
    run = tmp_path / "gpt_tiny"
    write_run(run, lm_summary(135.40259592974851))
    report_path, written, _ = report.write_report(str(run))
    assert report_path == str(run / "report.md")
    header, rows = parse_table(open(report_path).read())
    assert [row[0] for row in rows] == ["gpt_tiny"]
    assert rows[0][1] == "135.4026"  # 7 significant digits
    assert_numbers_match(header, rows, {"gpt_tiny": json.loads((run / "summary.json").read_text())})
    assert len(written) == 2
    for path in written:
        check_png(run / "plots" / path.rsplit("/", 1)[1])


def test_resumed_run_keeps_the_last_value_of_a_repeated_step(tmp_path):
    run = tmp_path / "r"
    write_run(run, lm_summary(10.0))
    with open(run / "metrics.jsonl", "a") as f:  # a resume re-logs step 2
        f.write(json.dumps({"step": 2, "train/loss": 1.5}) + "\n")
    steps, values = report.curve(report.load(str(run)).runs[0], "train/loss")
    assert steps == [1, 2, 3] and values == [6.0, 1.5, 4.0]


def test_unfinished_sweep_point_not_started(tmp_path):
    root = sweep_dir(tmp_path)
    points = json.loads((root / "sweep.json").read_text())
    points["points"].append({"name": "lr=1.0_seed=0", "overrides": {"optim.lr": 1.0, "seed": 0}})
    (root / "sweep.json").write_text(json.dumps(points))
    _, _, markdown = report.write_report(str(root))
    _, rows = parse_table(markdown)
    assert rows[-1][0] == "lr=1.0_seed=0" and rows[-1][-1] == "unfinished (not started)"


def test_bad_paths(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln.tools.report: error:") and "is not a directory" in err
    assert "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    assert "no sweep.json" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "summary.json").write_text("{not json")
    with pytest.raises(KilnError, match="summary.json is not valid JSON"):
        report.write_report(str(bad))


def test_x_scale_is_log_over_more_than_a_decade():
    assert report.x_scale([1e-4, 1e-3, 1e-2]) == "log"
    assert report.x_scale([1e-3, 3e-3]) == "linear"
    assert report.x_scale([0, 1]) == "linear"  # seeds
    assert report.x_scale([-1.0, 100.0]) == "linear"


def test_loss_by_source_table_and_plot(tmp_path):
    summary = lm_summary(20.0) | {
        "validation/source/bible/loss": 3.25,
        "test/source/bible/loss": 3.5,
        "validation/source/code/loss": 1.125,
        "test/source/code/loss": 1.25,
    }
    write_run(tmp_path / "run", summary)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        for step, (a, b) in enumerate([(4.0, 2.0), (3.25, 1.125)]):
            row = {"validation/source/bible/loss": a, "validation/source/code/loss": b}
            f.write(json.dumps({"step": step * 3, **row}) + "\n")
    path, written, markdown = report.write_report(str(tmp_path / "run"))
    text = open(path).read()
    assert "source/" not in markdown  # the main table keeps its usual columns
    assert "## Loss by source" in text
    assert "| run | 3.25 | 3.5 | 1.125 | 1.25 | 3 |" in text
    assert str(tmp_path / "run" / "plots" / "sources.png") in written
    assert open(written[-1], "rb").read(8) == PNG_SIGNATURE
