"""kiln.tools.reproduction_doc on a synthetic results dict (cells against numpy, holds, missing
cells, targets, PNGs), and the committed docs/reproduction.md against docs/reproduction.json."""

import json
import pathlib
import re

import matplotlib.image
import numpy as np

from kiln.tools import reproduction_doc

ROOT = pathlib.Path(__file__).parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Synthetic test metric per (pipeline, labels, arm): one value per seed 0, 1, ... More digits
# than the document shows, so rounding is checked too.
TESTS = {
    ("synthetic_a", 10, "finetune"): [0.61234, 0.65432, 0.62345],
    ("synthetic_a", 10, "scratch"): [0.30011, 0.34022, 0.31033],  # margin >> spread: yes
    ("synthetic_a", 50, "finetune"): [0.51111],
    ("synthetic_a", 50, "scratch"): [0.40222],  # one seed each: "1 seed"
    ("synthetic_a", 100, "finetune"): [0.70101, 0.78202, 0.74303],
    ("synthetic_a", 100, "scratch"): [0.69404, 0.73505, 0.76606],  # margin < spread: no
    ("synthetic_a", 500, "finetune"): [0.90123],  # scratch at 500 not run yet
    ("synthetic_b", 20, "finetune"): [30.123, 32.345],
    ("synthetic_b", 20, "scratch"): [10.011, 11.522],
    ("synthetic_b", 200, "finetune"): [50.55, 51.05],
    ("synthetic_b", 200, "scratch"): [50.25, 52.75],
}
FEWSHOT = [0.20111, 0.24222]  # synthetic_a, k=1, seeds 0 and 1


def pipeline(task, scale, train_size, labels, seeds, target, baselines, pretrain_seeds):
    return {
        "task": task,
        "metric": "accuracy",
        "scale": scale,
        "train_size": train_size,
        "test_examples": 1234,
        "labels": labels,
        "seeds": seeds,
        **({"target": target} if target else {}),
        "runs": [],
        "baselines": [
            {"name": n, "labels": x, "choice": "C=1", "validation": v, "test": v}
            for n, x, v in baselines
        ],
        "pretrain": [
            {
                "seed": s,
                "minutes": 10.25 + s,
                "steps": [0, 100, 200],
                "loss": [9.0, 5.0, 4.12345 + s],
                "validation_steps": [0, 200],
                "validation_loss": [9.1, 4.56789 + s],
            }
            for s in pretrain_seeds
        ],
    }


def synthetic_results():
    """Clearly synthetic numbers (not a real run) covering every cell state."""
    a = pipeline(
        "task_a",
        1.0,
        500,
        [10, 50, 100, 500],
        [0, 1, 2],
        {"baseline": "tfidf", "labels": 100},
        [("tfidf", 10, 0.45678), ("tfidf", 100, 0.72), ("majority", 500, 0.25)],
        [0, 1],
    )
    b = pipeline(
        "task_b", 100.0, 200, [20, 200], [0, 1], {"baseline": "copy_input", "labels": 20}, [], []
    )
    b["baselines"] = [{"name": "copy_input", "labels": 20, "choice": "-", "test": 40.04}]
    c = pipeline("task_c", 1.0, 300, [30, 300], [0], {"baseline": "tfidf", "labels": 30}, [], [])
    results = {
        "size": "synthetic",
        "command": "make reproduce REPRO_SIZE=synthetic",
        "machine": "test machine",
        "updated": "2000-01-01",
        "pipelines": {"synthetic_a": a, "synthetic_b": b, "synthetic_c": c},
    }
    for (name, labels, arm), values in TESTS.items():
        for seed, v in enumerate(values):
            run = {"seed": seed, "labels": labels, "arm": arm, "stage": f"{arm}_lr1e-3"}
            results["pipelines"][name]["runs"].append({**run, "validation": v, "test": v})
    for seed, v in enumerate(FEWSHOT):
        run = {"seed": seed, "labels": 0, "arm": "fewshot", "shots": 1, "test": v}
        a["runs"].append({**run, "stage": "fewshot", "validation": v, "minutes": 1.0})
    return results


def sections(text):
    """Markdown section (after a `## ` heading) by pipeline name."""
    parts = re.split(r"^## (\S+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def tables(text):
    """Each markdown table in text: (header, rows of cells)."""
    out = []
    for block in re.findall(r"(?:^\|.*\|$\n?)+", text, flags=re.M):
        cells = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
        assert set(block.splitlines()[1]) <= set("|-")
        out.append((cells[0], cells[2:]))
    return out


def expected_cell(values, digits):
    if not values:
        return "not run yet"
    mean = np.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {np.std(values, ddof=1):.{digits}f} (n={len(values)})"


def check_png(path):
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert matplotlib.image.imread(path).size > 0, path


def test_tables_match_numpy_and_holds():
    text = reproduction_doc.render(synthetic_results())
    doc = sections(text)
    assert list(doc) == ["synthetic_a", "synthetic_b", "synthetic_c"]
    for name, digits, holds in [
        ("synthetic_a", 3, ["yes", "1 seed", "no", "n/a"]),
        ("synthetic_b", 1, ["yes", "no"]),
        ("synthetic_c", 3, ["n/a", "n/a"]),
    ]:
        header, rows = tables(doc[name])[0]
        assert header[:5] == ["labeled examples", "fine-tuned", "scratch", "margin", "holds"]
        assert [row[4] for row in rows] == holds
        for row in rows:
            labels = int(re.sub(r"\D", "", row[0]))
            f, s = (TESTS.get((name, labels, arm), []) for arm in ("finetune", "scratch"))
            assert row[1] == expected_cell(f, digits) and row[2] == expected_cell(s, digits)
            margin = f"{np.mean(f) - np.mean(s):+.{digits}f}" if f and s else "n/a"
            assert row[3] == margin
    header, rows = tables(doc["synthetic_a"])[0]
    assert [row[0] for row in rows] == ["10", "50", "100", "all (500)"]
    assert header[5:] == ["tfidf", "majority"]
    assert [row[5:] for row in rows] == [
        ["0.457", "not run yet"],
        ["not run yet", "not run yet"],
        ["0.720", "not run yet"],
        ["not run yet", "0.250"],
    ]
    assert tables(doc["synthetic_b"])[0][1][0][5] == "40.0"
    fewshot = f"{np.mean(FEWSHOT):.3f} ± {np.std(FEWSHOT, ddof=1):.3f} (n=2)"
    assert f"k=1 demonstrations): test accuracy {fewshot}." in doc["synthetic_a"]
    assert "Few-shot" not in doc["synthetic_b"]


def test_targets_pretraining_and_missing():
    doc = sections(reproduction_doc.render(synthetic_results()))
    targets = {n: [ln for ln in s.splitlines() if ln.startswith("- ")] for n, s in doc.items()}
    a, b, c = targets["synthetic_a"], targets["synthetic_b"], targets["synthetic_c"]
    # 100 labels: margin within the spread, so missed; 500 (all) is not a part of it.
    parts = []
    for labels, holds in [(10, "yes"), (50, "1 seed"), (100, "no")]:
        f, s = (TESTS[("synthetic_a", labels, arm)] for arm in ("finetune", "scratch"))
        spread = sum(np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in (f, s))
        parts.append(f"{labels}: {np.mean(f) - np.mean(s):+.3f} vs {spread:.3f} ({holds})")
    assert f"**missed** ({'; '.join(parts)})." in a[0]
    assert "**met** (fine-tuned 0.742 vs tfidf 0.720)" in a[1]
    f, s = TESTS[("synthetic_b", 20, "finetune")], TESTS[("synthetic_b", 20, "scratch")]
    spread = np.std(f, ddof=1) + np.std(s, ddof=1)
    margin = np.mean(f) - np.mean(s)
    assert b[0].endswith(f"**met** (20: {margin:+.1f} vs {spread:.1f} (yes)).")  # not 200 (all)
    assert b[1].endswith("copy_input: **missed** (fine-tuned 31.2 vs copy_input 40.0).")
    assert "**not run yet**" in c[0] and "**not run yet**" in c[1]
    results = synthetic_results()
    results["pipelines"]["synthetic_c"]["target"]["baseline"] = None  # no target: no line
    c = sections(reproduction_doc.render(results))["synthetic_c"].splitlines()
    assert sum(ln.startswith("- ") for ln in c) == 1
    assert "Notes:" not in doc["synthetic_a"]  # none in the JSON, none in the document
    results["pipelines"]["synthetic_c"]["notes"] = ["a probe: 0.5 (`cmd`)", "another"]
    c = sections(reproduction_doc.render(results))["synthetic_c"]
    assert "Notes:\n\n- a probe: 0.5 (`cmd`)\n- another" in c
    header, rows = tables(doc["synthetic_a"])[1]
    assert header == ["seed", "minutes", "steps", "final train loss", "final validation loss"]
    assert rows == [
        ["0", "10.2", "200", "4.123", "4.568"],
        ["1", "11.2", "200", "5.123", "5.568"],
        ["2", "not run yet", "", "", ""],
    ]
    assert "reproduction/synthetic_a_labels.png" in doc["synthetic_a"]
    assert "reproduction/synthetic_b_pretrain.png" not in doc["synthetic_b"]  # nothing to plot
    assert "reproduction/synthetic_c_labels.png" not in doc["synthetic_c"]
    # Nothing invented: every cell of synthetic_c's results table is missing.
    assert all(
        cell in ("not run yet", "n/a")
        for row in tables(doc["synthetic_c"])[0][1]
        for cell in row[1:]
    )


def test_summarize():
    stats = reproduction_doc.summarize(synthetic_results())
    for key, values in TESTS.items():
        assert np.isclose(stats[key].mean, np.mean(values)) and stats[key].n == len(values)
        std = np.std(values, ddof=1) if len(values) > 1 else 0.0
        assert np.isclose(stats[key].std, std)
    assert stats[("synthetic_a", 0, "fewshot:1")].n == 2


def test_write_and_plot(tmp_path):
    results = synthetic_results()
    doc_path = tmp_path / "reproduction.md"
    reproduction_doc.write(json.loads(json.dumps(results)), str(doc_path))
    text = doc_path.read_text()
    assert text == reproduction_doc.render(results)  # deterministic, JSON round trip included
    links = re.findall(r"\]\((reproduction/[^)]+\.png)\)", text)
    assert sorted(links) == [
        "reproduction/synthetic_a_labels.png",
        "reproduction/synthetic_a_pretrain.png",
        "reproduction/synthetic_b_labels.png",
    ]
    for link in links:
        check_png(tmp_path / link)
    written = reproduction_doc.plot(results, str(tmp_path / "again"))
    assert sorted(pathlib.Path(p).name for p in written) == [link.split("/")[1] for link in links]
    for path in written:
        check_png(path)


def test_committed_document_equals_its_json():
    """docs/reproduction.md is render(docs/reproduction.json) and its plots exist."""
    json_path, doc_path = ROOT / "docs" / "reproduction.json", ROOT / "docs" / "reproduction.md"
    assert json_path.exists(), f"{json_path} is missing: run `make reproduce`"
    assert doc_path.exists(), f"{doc_path} is missing: run `make reproduce`"
    results = json.loads(json_path.read_text())
    text = doc_path.read_text()
    assert reproduction_doc.render(results) == text
    links = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert len(links) >= len(results["pipelines"])
    for link in links:
        check_png(doc_path.parent / link)


def test_one_seed_that_loses_is_a_no():
    results = synthetic_results()
    (run,) = [
        r
        for r in results["pipelines"]["synthetic_a"]["runs"]
        if (r["labels"], r["arm"]) == (50, "scratch")
    ]
    run["test"] = 0.6  # Above the one fine-tuned seed (0.511): no spread needed to say no.
    rows = tables(sections(reproduction_doc.render(results))["synthetic_a"])[0][1]
    assert [row[4] for row in rows] == ["yes", "no", "no", "n/a"]
