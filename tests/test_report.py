"""Tests of gdjax/report.py and launch/report.py: the strategies x seeds report.

Most tests write the runs themselves (config.json, metric rows through MetricLogger, a sample
grid) and check the report's numbers against means, standard errors (population std over
sqrt(n)) and sample stds computed here with the `statistics` and `math` modules, and the bold
entries of the LaTeX and Markdown tables against overlap sets computed here; one trains a tiny
2-experience digits run and reports it.
"""

import csv
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer
from matplotlib.colors import to_rgba
from PIL import Image

from configs import split_digits
from gdjax import report
from gdjax.grid import save_image_grid
from gdjax.logs import MetricLogger, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (42, 69, 1714)
STRATEGIES = ("naive", "full_generation_distillation")
# The paper's words, written out here rather than read from report.STRATEGY_LABELS.
LABELS = {"naive": "naive (fine-tuning)", "cumulative": "cumulative (joint)",
          "er": "experience replay", "no_distillation": "generative replay",
          "full_generation_distillation": "generative distillation",
          "partial_generation_distillation": "partial generation distillation",
          "gaussian_distillation": "gaussian distillation",
          "gaussian_symmetry_distillation": "gaussian symmetry distillation",
          "lwf_distillation": "LwF distillation"}
N_EXP = 5


def write_run(workdir, strategy="naive", seed=42, rows=(), *, grid=True, streams=None,
              **overrides):
    """A finished-looking run: config.json, metrics/experience.jsonl and sample grids, and
    the rows of `streams` ({stream: [(step, row)]})."""
    config = split_digits.get_config()
    config.strategy.name, config.seed = strategy, seed
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(config[section], name, value)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(json.loads(json.dumps(config.to_dict(), default=str)), f)
    with MetricLogger(workdir, tensorboard=False) as logger:
        for k, row in enumerate(rows):
            logger.write("experience", 400 * (k + 1), {"experience": k,
                                                       "classes_seen": 2 * (k + 1), **row})
            if grid:
                shade = np.full((4, 8, 8, 1), (k + 1) / len(rows), np.float32)
                save_image_grid(shade, os.path.join(workdir, "samples", f"experience_{k}.png"))
        for stream, stream_rows in (streams or {}).items():
            for step, row in stream_rows:
                logger.write(stream, step, row)
    return str(workdir)


def metric_rows(s, i):
    """Distinct made-up metric values for strategy index s, seed index i, per experience."""
    rng = np.random.default_rng([s, i])
    rows = []
    for k in range(N_EXP):
        frac = rng.dirichlet(np.ones(10))
        rows.append({"kld": float(rng.uniform(0, 1)), "ard": float(rng.uniform(0, 1)),
                     "fd_classifier": float(rng.uniform(10, 100)),
                     **{f"gen_frac_class_{c}": float(f) for c, f in enumerate(frac)}})
    return rows


@pytest.fixture(scope="module")
def grid_runs(tmp_path_factory):
    """2 strategies x 3 seeds; returns (workdirs, {(strategy, seed): rows})."""
    root = tmp_path_factory.mktemp("runs")
    workdirs, written = [], {}
    for s, strategy in enumerate(STRATEGIES):
        for i, seed in enumerate(SEEDS):
            rows = metric_rows(s, i)
            workdirs.append(write_run(root / f"{strategy}_{seed}", strategy, seed, rows))
            written[strategy, seed] = rows
    return workdirs, written


@pytest.fixture(scope="module")
def written_report(grid_runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("report"))
    return out, report.write_report(grid_runs[0], out)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hand_sem(values):
    """The authors' standard error: population std (ddof 0) over sqrt(n)."""
    return statistics.pstdev(values) / math.sqrt(len(values))


def hand_stats(written, strategy, metric, k):
    """(mean, standard error, sample std) over SEEDS."""
    values = [written[strategy, seed][k][metric] for seed in SEEDS]
    return statistics.mean(values), hand_sem(values), statistics.stdev(values)  # stdev: ddof 1


def hand_cell(mean, sem, std, bold=False):
    text = f"{mean:.4g} ± {sem:.2g} (std {std:.2g})"
    return f"**{text}**" if bold else text


def markdown_rows(text, heading):
    """{first cell: cells} of the first table after `heading`."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    header, body = table[0], table[2:]
    return header, {row[0]: row for row in body}


# ----------------------------------------------------------------------------- numbers

def test_files_written(written_report):
    out, written = written_report
    expected = {"report.md", "last_experience.csv", "last_experience.tex", "per_experience.csv",
                "kld.png", "ard.png", "fd_classifier.png", "class_histogram.png", "samples.png",
                "summary.json"}
    assert set(written) == expected
    assert all(written[name] == os.path.join(out, name) for name in expected)
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files left


def test_per_experience_csv_matches_hand_computed(grid_runs, written_report):
    rows = read_csv(written_report[1]["per_experience.csv"])
    assert list(rows[0]) == ["strategy", "label", "metric", "experience", "mean", "sem", "std",
                             "n"]
    # 2 strategies x 5 experiences x (3 metrics + 10 class fractions)
    assert len(rows) == 2 * N_EXP * 13
    for row in rows:
        assert row["label"] == LABELS[row["strategy"]]
        mean, sem, std = hand_stats(grid_runs[1], row["strategy"], row["metric"],
                                    int(row["experience"]))
        assert float(row["mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-15)
        assert float(row["sem"]) == pytest.approx(sem, rel=1e-9)
        assert float(row["std"]) == pytest.approx(std, rel=1e-9)
        assert row["n"] == "3"


def test_last_experience_csv_and_markdown(grid_runs, written_report):
    written = written_report[1]
    rows = read_csv(written["last_experience.csv"])
    assert {r["experience"] for r in rows} == {str(N_EXP - 1)}
    by_key = {(r["strategy"], r["metric"]): r for r in rows}
    text = open(written["report.md"]).read()
    assert "sample standard deviation (ddof 1)" in text
    assert "population standard deviation (ddof 0) over sqrt(n)" in text
    header, table = markdown_rows(text, "## At the last experience")
    assert header == ["strategy", "n", "experience", "classes seen", "KLD ↓ (mean ± SE)",
                      "ARD ↓ (mean ± SE)", "fd_classifier ↓ (mean ± SE)"]
    assert list(table) == [LABELS[s] for s in STRATEGIES]  # the canonical strategy order
    last = N_EXP - 1
    for column, metric in zip(header[4:], ("kld", "ard", "fd_classifier")):
        # generative distillation is the only contender, so the best; naive is bold where
        # its interval overlaps the best's.
        gd, naive = (hand_stats(grid_runs[1], s, metric, last) for s in reversed(STRATEGIES))
        naive_bold = naive[0] - naive[1] <= gd[0] + gd[1] and naive[0] + naive[1] >= gd[0] - gd[1]
        for strategy, stats, bold in (("naive", naive, naive_bold),
                                      ("full_generation_distillation", gd, True)):
            row = table[LABELS[strategy]]
            assert row[1:4] == ["3", str(last), "10"]
            assert float(by_key[strategy, metric]["mean"]) == pytest.approx(stats[0], rel=1e-12)
            assert float(by_key[strategy, metric]["sem"]) == pytest.approx(stats[1], rel=1e-9)
            assert row[header.index(column)] == hand_cell(*stats, bold=bold)


def test_per_experience_markdown_tables(grid_runs, written_report):
    text = open(written_report[1]["report.md"]).read()
    header, table = markdown_rows(text, "### fd_classifier ↓")
    assert header == ["strategy"] + [str(k) for k in range(N_EXP)]
    for strategy in STRATEGIES:
        for k in range(N_EXP):  # no bold in the per-experience tables
            stats = hand_stats(grid_runs[1], strategy, "fd_classifier", k)
            assert table[LABELS[strategy]][1 + k] == hand_cell(*stats)
    runs = [line.split("|")[1:3] for line in text.split("## Runs")[1].strip().splitlines()[2:]]
    assert [(s.strip(), seed.strip()) for s, seed in runs] == [
        (LABELS[s], str(seed)) for s in STRATEGIES for seed in SEEDS]  # numeric seed order


def test_pngs_open_with_sane_sizes(written_report):
    written = written_report[1]
    sizes = {}
    for name, path in written.items():
        if name.endswith(".png"):
            with Image.open(path) as image:
                image.load()
                sizes[name] = image.size
    assert sizes["kld.png"] == (640, 400)
    assert sizes["class_histogram.png"] == (640, 500)  # 0.6 + 2.2 inches per strategy
    width, height = sizes["samples.png"]  # two grids side by side, cropped to the content
    assert 560 <= width <= 700 and 300 <= height <= 420


def _bands(ax):
    """The fill_between patches of an axes."""
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_metric_figure_draws_hand_computed_means_and_standard_error_bands(grid_runs):
    """Per strategy one line through the means and one band whose extent at each experience
    is mean ± standard error, both computed here from the written rows; the legend and the
    title in words."""
    fig = report.metric_figure(report.per_experience(report.load_runs(grid_runs[0])),
                               "fd_classifier")
    ax, = fig.axes
    assert [line.get_label() for line in ax.lines] == [LABELS[s] for s in STRATEGIES]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [LABELS[s] for s in STRATEGIES]
    assert "band ± standard error" in ax.get_title()
    assert len(_bands(ax)) == len(STRATEGIES)
    for line, band, strategy in zip(ax.lines, _bands(ax), STRATEGIES):
        mean, sem, _ = np.array([hand_stats(grid_runs[1], strategy, "fd_classifier", k)
                                 for k in range(N_EXP)]).T
        np.testing.assert_array_equal(line.get_xdata(), np.arange(N_EXP))
        np.testing.assert_allclose(line.get_ydata(), mean, rtol=1e-12)
        vertices = np.concatenate([p.vertices for p in band.get_paths()])
        for k in range(N_EXP):
            ys = vertices[vertices[:, 0] == k, 1]
            assert ys.min() == pytest.approx(mean[k] - sem[k], rel=1e-9)
            assert ys.max() == pytest.approx(mean[k] + sem[k], rel=1e-9)
        assert band.get_facecolor()[0][:3] == pytest.approx(to_rgba(line.get_color())[:3])


def test_class_histogram_figure_bars_are_the_true_and_generated_fractions(tmp_path):
    """Two seeds after experience 1 of a fixed class order 9, 8, ..., 0 (2 classes per
    experience): true bars 1/4 on classes 6..9, generated bars the mean over seeds of the
    logged fractions with their standard error as error bars."""
    order = tuple(range(9, -1, -1))
    written = {}
    for seed in (42, 69):
        rng = np.random.default_rng(seed)
        rows = [{f"gen_frac_class_{c}": float(f) for c, f in enumerate(rng.dirichlet(np.ones(10)))}
                for _ in range(2)]
        written[seed] = [rows[1][f"gen_frac_class_{c}"] for c in range(10)]
        write_run(tmp_path / str(seed), seed=seed, rows=rows, grid=False,
                  data__class_order=order)
    groups = report.load_runs([str(tmp_path / "42"), str(tmp_path / "69")])
    fig = report.class_histogram_figure(groups, report.last_experiences(groups))
    ax, = fig.axes
    assert ax.get_title() == "naive (fine-tuning): experience 1, n=2"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "true (test images of the classes seen)", "generated (mean ± standard error)"]
    true_bars, gen_bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    np.testing.assert_allclose([b.get_height() for b in true_bars], [0] * 6 + [0.25] * 4,
                               rtol=0, atol=1e-15)
    gen_mean = [statistics.mean(v) for v in zip(*written.values())]
    gen_sem = [hand_sem(v) for v in zip(*written.values())]
    np.testing.assert_allclose([b.get_height() for b in gen_bars], gen_mean, rtol=1e-12)
    np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in gen_bars],
                               np.arange(10) + 0.2)
    caps = gen_bars.errorbar.lines[2][0].get_segments()  # one vertical segment per bar
    np.testing.assert_allclose([seg[:, 1] for seg in caps],
                               np.stack([np.subtract(gen_mean, gen_sem),
                                         np.add(gen_mean, gen_sem)], 1), rtol=1e-12)


def test_class_histogram_data(grid_runs):
    groups = report.load_runs(grid_runs[0])
    gen, true = report._histogram_data(groups["naive (fine-tuning)"], N_EXP - 1)
    expected = [[grid_runs[1]["naive", seed][N_EXP - 1][f"gen_frac_class_{c}"] for c in range(10)]
                for seed in SEEDS]
    np.testing.assert_allclose(gen, expected, rtol=0, atol=0)
    np.testing.assert_allclose(true, np.full((3, 10), 0.1))  # all classes seen: uniform


def test_true_frequencies_follow_the_class_order(tmp_path):
    row = {f"gen_frac_class_{c}": 0.1 for c in range(10)}
    run = report.load_run(write_run(tmp_path / "a", seed=42, rows=[row, row], grid=False))
    # Seed 42 draws the order 2 6 1 8 4 5 0 9 3 7 (README): after experience 1, 4 classes.
    expected = np.zeros(10)
    expected[[2, 6, 1, 8]] = 0.25
    np.testing.assert_array_equal(report.true_frequencies(run, 1, 10), expected)
    logged = {**row, **{f"true_frac_class_{c}": c / 45 for c in range(10)}}
    run = report.load_run(write_run(tmp_path / "b", seed=42, rows=[logged], grid=False))
    np.testing.assert_allclose(report.true_frequencies(run, 0, 10), np.arange(10) / 45)


# ----------------------------------------------------------------------------- best entries

# strategy -> (FID per seed, solver accuracy per seed), seeds 42 and 69 (42 only where one
# value is given). With SE = |a - b| / 2 / sqrt(2) for two seeds the intervals mean ± SE are:
# FID (lower is better): the best contender is generative distillation, 10 ± 0.707; of the
#   four other two-seed contenders exactly two overlap it: experience replay (10.4 ± 0.14)
#   and gaussian distillation (11.2 ± 0.85, its mean outside the best's interval), not
#   generative replay (12 ± 0.71) or LwF (16 ± 1.4); the one-seed partial generation (10.5)
#   lies inside, gaussian symmetry (12) does not; naive (11.5 ± 1.06) overlaps and is bold
#   though it is no contender; cumulative (5 ± 0.71) has the lowest mean but is no contender.
# Solver accuracy (higher is better): the best contender is generative replay (0.72 ± 0.014);
#   gaussian distillation (0.70 ± 0.014) and the one-seed partial generation (0.715) overlap
#   it, experience replay (0.68 ± 0.014) does not; cumulative (0.96) is highest, no contender.
BOLD_RUNS = {
    "naive": ((10.0, 13.0), (0.20, 0.24)),
    "cumulative": ((4.0, 6.0), (0.95, 0.97)),
    "er": ((10.2, 10.6), (0.66, 0.70)),
    "no_distillation": ((11.0, 13.0), (0.70, 0.74)),
    "full_generation_distillation": ((9.0, 11.0), (0.60, 0.64)),
    "partial_generation_distillation": ((10.5,), (0.715,)),
    "gaussian_distillation": ((10.0, 12.4), (0.68, 0.72)),
    "gaussian_symmetry_distillation": ((12.0,), (0.60,)),
    "lwf_distillation": ((14.0, 18.0), (0.50, 0.54)),
}
EXPECTED_BOLD = {
    "fid": {"naive", "er", "full_generation_distillation", "partial_generation_distillation",
            "gaussian_distillation"},
    "classifier_accuracy": {"no_distillation", "partial_generation_distillation",
                            "gaussian_distillation"},
}


@pytest.fixture(scope="module")
def bold_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bold")
    workdirs = []
    for strategy, (fids, accuracies) in BOLD_RUNS.items():
        for seed, fid, accuracy in zip(SEEDS, fids, accuracies):
            # checksum: a metric of no known direction, equal everywhere
            row = {"fid": fid, "classifier_accuracy": accuracy, "checksum": 1.0}
            workdirs.append(write_run(root / f"{strategy}_{seed}", strategy, seed, [row],
                                      grid=False))
    out = str(tmp_path_factory.mktemp("bold_report"))
    return workdirs, report.write_report(workdirs, out)


def hand_interval(values):
    mean = statistics.mean(values)
    sem = hand_sem(values) if len(values) > 1 else 0.0  # one seed: the mean alone
    return mean - sem, mean + sem


def hand_bold(metric):
    """The overlap set computed here: the best among strategies other than naive and
    cumulative, then every strategy whose interval meets the best's."""
    column = 0 if metric == "fid" else 1
    values = {strategy: v[column] for strategy, v in BOLD_RUNS.items()}
    contenders = [s for s in values if s not in ("naive", "cumulative")]
    pick = min if metric == "fid" else max
    low, high = hand_interval(values[pick(contenders, key=lambda s: statistics.mean(values[s]))])
    return {s for s, v in values.items()
            if hand_interval(v)[0] <= high and hand_interval(v)[1] >= low}


def latex_rows(tex):
    """(header cells, {first cell: cells}) of the tabular in `tex`."""
    lines = [line.strip() for line in tex.splitlines()]

    def cells(line):
        assert line.endswith(r" \\"), line
        return line[:-3].split(" & ")
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    return cells(lines[lines.index(r"\toprule") + 1]), {c[0]: c for c in map(cells, body)}


def test_hand_computed_overlap_sets_are_the_designed_ones():
    assert hand_bold("fid") == EXPECTED_BOLD["fid"]
    assert hand_bold("classifier_accuracy") == EXPECTED_BOLD["classifier_accuracy"]


def test_latex_bolds_the_entries_overlapping_the_best(bold_report):
    tex = open(bold_report[1]["last_experience.tex"]).read()
    header, rows = latex_rows(tex)
    assert header == ["strategy", r"FID $\downarrow$", r"solver accuracy $\uparrow$"]
    assert list(rows) == [LABELS[s] for s in BOLD_RUNS]  # canonical order, paper's words
    for column, metric in ((1, "fid"), (2, "classifier_accuracy")):
        bold = {s for s in BOLD_RUNS if rows[LABELS[s]][column].startswith(r"\textbf{")}
        assert bold == hand_bold(metric)
        for strategy, per_metric in BOLD_RUNS.items():
            values = per_metric[column - 1]
            text = f"{statistics.mean(values):.3f}"
            if len(values) > 1:
                text += rf" $\pm$ {hand_sem(values):.3f}"
            if strategy in bold:
                text = rf"\textbf{{{text}}}"
            assert rows[LABELS[strategy]][column] == text
    assert r"\begin{tabular}{lcc}" in tex and r"\caption{digits, last experience" in tex


def test_markdown_bolds_the_same_entries(bold_report):
    header, table = markdown_rows(open(bold_report[1]["report.md"]).read(), "## At the last")
    assert header[4:] == ["FID ↓ (mean ± SE)", "solver accuracy ↑ (mean ± SE)",
                          "checksum (mean ± SE)"]
    assert list(table) == [LABELS[s] for s in BOLD_RUNS]
    for column, metric in ((4, "fid"), (5, "classifier_accuracy")):
        bold = {s for s in BOLD_RUNS if table[LABELS[s]][column].startswith("**")}
        assert bold == hand_bold(metric)
    assert not [row for row in table.values() if row[6].startswith("**")]  # no direction
    assert table["partial generation distillation"][1] == "1"
    assert table["partial generation distillation"][4] == "**10.5**"  # one seed: no ± or std
    naive = BOLD_RUNS["naive"][0]
    assert table["naive (fine-tuning)"][4] == hand_cell(
        statistics.mean(naive), hand_sem(naive), statistics.stdev(naive), bold=True)


def test_plot_legends_in_the_paper_words(bold_report):
    groups = report.load_runs(bold_report[0])
    fig = report.metric_figure(report.per_experience(groups), "fid")
    ax, = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [LABELS[s] for s in BOLD_RUNS]
    assert ax.get_ylabel() == "FID ↓"


def test_latex_escapes_special_characters(tmp_path):
    runs = [write_run(tmp_path / f"gd{steps}", "full_generation_distillation", 42,
                      [{"fid": float(steps)}], grid=False, strategy__teacher_steps=steps)
            for steps in (2, 10)]
    tex = open(report.write_report(runs, str(tmp_path / "out"))["last_experience.tex"]).read()
    _, rows = latex_rows(tex)
    assert sorted(rows) == [r"generative distillation (strategy.teacher\_steps=10)",
                            r"generative distillation (strategy.teacher\_steps=2)"]
    assert "teacher_steps" not in tex
    assert report.latex_escape(r"a_b & 50% $x$ #1 {y} ~^ \ <|>") == (
        r"a\_b \& 50\% \$x\$ \#1 \{y\} \textasciitilde{}\textasciicircum{} \textbackslash{} "
        r"\textless{}\textbar{}\textgreater{}")


# ----------------------------------------------------------------------------- grouping

def test_labels_name_the_config_keys_that_differ(tmp_path):
    rows = [{"kld": 1.0}]
    runs = [write_run(tmp_path / "gd1", "full_generation_distillation", 42, rows,
                      strategy__lambd=1.0),
            write_run(tmp_path / "gd3", "full_generation_distillation", 42, rows,
                      strategy__lambd=3.0),
            # A different lambd means nothing to naive; bookkeeping keys never split labels.
            write_run(tmp_path / "n1", "naive", 42, rows, strategy__lambd=1.0),
            write_run(tmp_path / "n2", "naive", 69, rows, strategy__lambd=1.0,
                      log__tensorboard=False, data__data_dir="/elsewhere")]
    groups = report.load_runs(runs)
    assert list(groups) == ["naive (fine-tuning)", "generative distillation (strategy.lambd=1.0)",
                            "generative distillation (strategy.lambd=3.0)"]
    assert [r.seed for r in groups["naive (fine-tuning)"]] == [42, 69]


def test_a_generator_regulariser_and_class_conditioning_are_named_in_the_label(tmp_path):
    rows = [{"kld": 1.0}]
    old = write_run(tmp_path / "old", "naive", 42, rows, grid=False)
    path = os.path.join(old, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config["strategy"]["regulariser"]  # written before the regularisers existed
    with open(path, "w") as f:
        json.dump(config, f)
    runs = [old, write_run(tmp_path / "ewc", "naive", 42, rows, grid=False,
                           strategy__regulariser="ewc", strategy__regulariser_weight=10.0),
            write_run(tmp_path / "si", "naive", 42, rows, grid=False,
                      strategy__regulariser="si"),
            write_run(tmp_path / "gd_si", "full_generation_distillation", 42, rows,
                      grid=False, strategy__regulariser="si"),
            write_run(tmp_path / "gd", "full_generation_distillation", 42, rows, grid=False),
            write_run(tmp_path / "gd_c", "full_generation_distillation", 42, rows, grid=False,
                      model__class_conditional=True),
            write_run(tmp_path / "gd_c2", "full_generation_distillation", 42, rows,
                      grid=False, model__class_conditional=True,
                      strategy__teacher_guidance=2.0)]
    groups = report.load_runs(runs)
    assert sorted(groups) == sorted([
        "naive (fine-tuning)", "naive (fine-tuning) + EWC", "naive (fine-tuning) + SI",
        "generative distillation + SI", "generative distillation",
        "generative distillation, class-conditional (strategy.teacher_guidance=1.0)",
        "generative distillation, class-conditional (strategy.teacher_guidance=2.0)"])


def test_runs_of_older_code_share_a_label_with_newer_runs(tmp_path):
    """A config.json written before a key existed (rundir.ADDED_KEYS) is the same run kind as
    one holding that key's old-code value; another value there still sets a run apart."""
    rows = [{"kld": 1.0}]
    old = write_run(tmp_path / "old", "naive", 42, rows, grid=False)
    path = os.path.join(old, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config["eval"]["every_steps"], config["train"]["ema_decay"]
    with open(path, "w") as f:
        json.dump(config, f)
    new = write_run(tmp_path / "new", "naive", 69, rows, grid=False)
    other = write_run(tmp_path / "other", "naive", 1714, rows, grid=False,
                      train__ema_decay=0.5)
    groups = report.load_runs([old, new])
    assert list(groups) == ["naive (fine-tuning)"]
    assert [r.seed for r in groups["naive (fine-tuning)"]] == [42, 69]
    groups = report.load_runs([old, new, other])
    assert sorted(groups) == ["naive (fine-tuning)",
                              "naive (fine-tuning), EMA of the params (decay 0.5)"]
    assert [r.seed for r in groups["naive (fine-tuning)"]] == [42, 69]


def test_a_moving_average_min_snr_timesteps_and_no_clip_are_named_in_the_label(tmp_path):
    rows = [{"kld": 1.0}]
    gd = "full_generation_distillation"
    runs = [write_run(tmp_path / "gd", gd, 42, rows, grid=False),
            # gamma means nothing to uniform timesteps: the same method as the plain run
            write_run(tmp_path / "gd_g", gd, 69, rows, grid=False,
                      strategy__replay_snr_gamma=2.0),
            write_run(tmp_path / "ema", gd, 42, rows, grid=False, train__ema_decay=0.98,
                      train__ema_teacher=True),
            write_run(tmp_path / "ema_eval", gd, 42, rows, grid=False,
                      train__ema_decay=0.9),
            write_run(tmp_path / "snr", gd, 42, rows, grid=False,
                      strategy__replay_timesteps="min_snr"),
            write_run(tmp_path / "snr2", gd, 42, rows, grid=False,
                      strategy__replay_timesteps="min_snr", strategy__replay_snr_gamma=2.0),
            write_run(tmp_path / "noclip", gd, 42, rows, grid=False,
                      diffusion__clip_sample=False)]
    groups = report.load_runs(runs)
    assert sorted(groups) == sorted([
        "generative distillation",
        "generative distillation, EMA teacher (decay 0.98)",
        "generative distillation, EMA of the params (decay 0.9)",
        "generative distillation, min-SNR replay timesteps (γ = 5.0)",
        "generative distillation, min-SNR replay timesteps (γ = 2.0)",
        "generative distillation, DDIM without the x0 clip"])
    assert [r.seed for r in groups["generative distillation"]] == [42, 69]


def test_missing_values_lower_n_and_are_marked(tmp_path):
    runs = [write_run(tmp_path / f"s{seed}", "naive", seed,
                      [{"kld": 0.5, **({"fid": float(seed)} if seed != 42 else {})}], grid=False)
            for seed in SEEDS]
    out = tmp_path / "out"
    written = report.write_report(runs, str(out))
    fid = [r for r in read_csv(written["last_experience.csv"]) if r["metric"] == "fid"]
    assert fid[0]["n"] == "2" and float(fid[0]["mean"]) == (69 + 1714) / 2
    header, table = markdown_rows(open(written["report.md"]).read(), "## At the last")
    assert header[4] == "FID ↓ (mean ± SE)"  # the paper's metrics first
    sem, std = hand_sem([69, 1714]), statistics.stdev([69, 1714])
    # naive alone: no contender for the best, so nothing is bold.
    assert table["naive (fine-tuning)"][4] == f"{891.5:.4g} ± {sem:.2g} (std {std:.2g}, n=2)"
    assert table["naive (fine-tuning)"][5] == "0.5 ± 0 (std 0)"
    assert "samples.png" not in written and "class_histogram.png" not in written


def test_one_seed_has_no_std(tmp_path):
    written = report.write_report([write_run(tmp_path / "r", rows=[{"kld": 0.25}])],
                                  str(tmp_path / "out"))
    row, = [r for r in read_csv(written["last_experience.csv"]) if r["metric"] == "kld"]
    assert row["mean"] == "0.25" and row["n"] == "1"
    assert math.isnan(float(row["sem"])) and math.isnan(float(row["std"]))
    _, table = markdown_rows(open(written["report.md"]).read(), "## At the last")
    assert table["naive (fine-tuning)"][4] == "0.25"
    assert "naive (fine-tuning) & 0.250 \\\\" in open(written["last_experience.tex"]).read()


# The best-seed summary: fd_classifier curves over 5 experiences and the AUCs by hand
# (trapezoid rule, unit spacing): 8+5+3.5+2.5 = 19, 7+5+5+5 = 22, 7+2+2+2 = 13.
BEST_CURVES = {42: [10, 6, 4, 3, 2], 69: [9, 5, 5, 5, 5], 1714: [12, 2, 2, 2, 2]}
BEST_AUCS = {42: 19.0, 69: 22.0, 1714: 13.0}
BEST_FORGETTING = {42: 0.3, 69: 0.1, 1714: 0.2}


def _best_seed_runs(root, *, fid_everywhere):
    workdirs = []
    for seed, curve in BEST_CURVES.items():
        rows = [{"fd_classifier": float(v), "kld": 1.0} for v in curve]
        for k, row in enumerate(rows):
            if fid_everywhere or k == len(rows) - 1:
                row["fid"] = 100.0 - seed / 100 - k  # lowest AUC: seed 1714
        rows[-1]["classifier_forgetting"] = BEST_FORGETTING[seed]
        workdirs.append(write_run(root / f"gd_{seed}", "full_generation_distillation", seed,
                                  rows, grid=False))
    return workdirs


def test_best_seed_summary_by_hand(tmp_path):
    out = tmp_path / "report"
    report.write_report(_best_seed_runs(tmp_path, fid_everywhere=False), str(out))
    with open(out / "summary.json") as f:
        entry = json.load(f)["generative distillation"]
    assert entry["strategy"] == "full_generation_distillation"
    assert entry["seeds"] == [42, 69, 1714]
    by_auc, by_forgetting = entry["best"]
    # FID only at the last experience: the AUC falls back to fd_classifier.
    assert by_auc["criterion"] == "fd_classifier_auc"
    assert by_auc["seed"] == 1714 and by_auc["value"] == BEST_AUCS[1714]
    assert by_auc["last"]["fd_classifier"] == 2.0
    assert by_auc["last"]["fid"] == 100.0 - 17.14 - 4
    assert by_forgetting["criterion"] == "classifier_forgetting"
    assert by_forgetting["seed"] == 69 and by_forgetting["value"] == 0.1
    header, rows = markdown_rows((out / "report.md").read_text(), "## Best seed")
    assert header[:4] == ["strategy", "best by", "seed", "value"]
    assert [r[1:4] for r in rows.values()] == [["solver forgetting", "69", "0.1"]]
    text = (out / "report.md").read_text()
    assert "| generative distillation | fd_classifier_auc | 1714 | 13 |" in text


def test_best_seed_ranks_by_fid_where_every_experience_has_it(tmp_path):
    runs = report.load_runs(_best_seed_runs(tmp_path, fid_everywhere=True))
    (by_auc, _), = [report.best_seeds(r) for r in runs.values()]
    # FID 100 - seed/100 - k over k = 0..4: AUC = 4 * (100 - seed/100) - 8.
    assert by_auc.criterion == "fid_auc" and by_auc.seed == 1714
    assert by_auc.value == pytest.approx(4 * (100 - 17.14) - 8, abs=1e-12)


# Compute: per experience k = 0, 1, 2 (TFLOP) and wall seconds, written by hand; the
# distillation run's totals 3 + 5 + 5 = 13 TFLOP and 60 + 120 + 120 = 300 s (seed 69 takes
# 1.5 times as long: 450 s).
COSTS = {"no_distillation": ([2, 4, 4], [60, 90, 90]),
         "full_generation_distillation": ([3, 5, 5], [60, 120, 120]),
         "cumulative": ([2, 2, 2], [30, 60, 90])}


def _cost_runs(root):
    workdirs = []
    for strategy, (tflop, wall) in COSTS.items():
        for seed in (42, 69):
            rows = [{"kld": 1.0 / (k + 1)} for k in range(3)]
            compute = [(400 * (k + 1), {
                "experience": k, "generator_flops": tflop[k] * 1e12,
                "student_flops": tflop[k] * 1e12 / 2,
                "teacher_sampling_flops": tflop[k] * 1e12 / 4,
                "teacher_labelling_flops": tflop[k] * 1e12 / 4}) for k in range(3)]
            # Two timing rows in experience k: they add up.
            slower = 1.5 if seed == 69 else 1.0
            timing = [(400 * k + 200 * (i + 1), {"experience": k,
                                                 "wall_s": part * wall[k] * slower})
                      for k in range(3) for i, part in enumerate((0.25, 0.75))]
            workdirs.append(write_run(root / f"{strategy}_{seed}", strategy, seed, rows,
                                      grid=False, streams={"compute": compute,
                                                           "timing": timing}))
    return workdirs


def test_compute_totals_ratios_and_figures_by_hand(tmp_path):
    out = tmp_path / "report"
    written = report.write_report(_cost_runs(tmp_path), str(out))
    assert {"metrics_vs_compute.png", "metrics_vs_wall_time.png"} <= set(written)
    header, rows = markdown_rows((out / "report.md").read_text(), "## Compute")
    gd = rows["generative distillation"]
    cells = dict(zip(header, gd))
    assert cells["generator TFLOP"] == "13" and cells["student"] == "6.5"
    assert cells["teacher sampling"] == cells["teacher labelling"] == "3.25"
    assert cells["FLOPs x generative replay"] == f"{13 / 10:.3g}x"
    assert cells["FLOPs x cumulative (joint)"] == f"{13 / 6:.3g}x"
    minutes = [5.0, 7.5]
    assert cells["wall time (min)"] == hand_cell(statistics.mean(minutes), hand_sem(minutes),
                                                 statistics.stdev(minutes))
    assert cells["time x generative replay"] == f"{300 / 240:.3g}x"
    assert cells["time x cumulative (joint)"] == f"{300 / 180:.3g}x"
    fig = report.cost_figure(report.load_runs(_cost_runs(tmp_path / "again")),
                             report.per_experience(report.load_runs(_cost_runs(tmp_path / "t"))),
                             "generator_flops")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["generative distillation"].get_xdata(), [3, 8, 13])
    np.testing.assert_allclose(lines["generative distillation"].get_ydata(), [1, 1 / 2, 1 / 3])


def test_runs_without_compute_rows_say_so(grid_runs, written_report):
    out, written = written_report
    assert "metrics_vs_compute.png" not in written
    with open(os.path.join(out, "report.md")) as f:
        assert "No compute: no run has metrics/compute.jsonl" in f.read()


def test_find_runs_expands_globs_in_order_without_repeats(tmp_path):
    for name in ("b1", "b2", "a"):
        (tmp_path / name).mkdir()
    (tmp_path / "b3.txt").write_text("not a directory")
    found = report.find_runs([str(tmp_path / "a"), str(tmp_path / "b*"), str(tmp_path / "a")])
    assert found == [str(tmp_path / n) for n in ("a", "b1", "b2")]


# ----------------------------------------------------------------------------- errors

def test_runs_of_different_data_sets_are_refused(tmp_path):
    a = write_run(tmp_path / "a", rows=[{"kld": 1.0}])
    b = write_run(tmp_path / "b", rows=[{"kld": 1.0}], data__name="mnist")
    with pytest.raises(ValueError, match="different data sets") as e:
        report.write_report([a, b], str(tmp_path / "out"))
    assert a in str(e.value) and b in str(e.value)
    assert "'digits'" in str(e.value) and "'mnist'" in str(e.value)


def test_not_a_run_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json: not a gdjax run "
                                                r"directory.*Remove .*empty from --runs"):
        report.write_report([str(tmp_path / "empty")], str(tmp_path / "out"))
    started = write_run(tmp_path / "started", rows=[])
    with pytest.raises(ValueError, match=r"started has no evaluated experience.*not a finished"):
        report.write_report([started], str(tmp_path / "out"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match=r"other.config.json is not a gdjax run config: it has "
                                         r"no data, model.*Remove .*other from --runs"):
        report.load_run(str(tmp_path / "other"))
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_no_runs_matched(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs matched"):
        report.find_runs([str(tmp_path / "nothing*")])
    with pytest.raises(ValueError, match="no runs given"):
        report.find_runs(["", " "])
    with pytest.raises(ValueError, match="no runs matched"):
        report.write_report([], str(tmp_path / "out"))


def test_same_seed_twice_is_refused(tmp_path):
    a = write_run(tmp_path / "a", rows=[{"kld": 1.0}])
    b = write_run(tmp_path / "copy_of_a", rows=[{"kld": 1.0}])
    with pytest.raises(ValueError, match="seed 42") as e:
        report.load_runs([a, b])
    assert a in str(e.value) and b in str(e.value)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow  # a whole run then the report, through the command lines, ~12 s
def test_tiny_digits_run_then_report_from_the_command_line(tmp_path):
    """A real 2-experience run (fake, instant eval hook) reported by `python -m launch.report`."""
    from gdjax import continual
    from tests.helpers import tiny_config

    def hook(run, k, params):
        del params
        fractions = {f"gen_frac_class_{c}": 1.0 if c == run.experiences[k][0] else 0.0
                     for c in range(10)}
        return {"kld": 0.5 + k, "fd_classifier": 10.0 * (k + 1), **fractions}

    workdir = str(tmp_path / "run")
    config = tiny_config("naive")
    config.solver.enabled = False  # the classifier trained alongside: tested elsewhere, slow
    continual.train(config, workdir, eval_hook=hook)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "launch.report", f"--runs={tmp_path}/ru*",
                             f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "1 runs -> 11 files" in result.stdout
    # The run's own compute rows: naive's generator FLOPs are its student's alone.
    _, costs = markdown_rows((out / "report.md").read_text(), "## Compute")
    flops = read_metrics(workdir, "compute")
    total = sum(r["generator_flops"] for r in flops)
    assert total > 0 and costs["naive (fine-tuning)"][1] == f"{total / 1e12:.4g}"
    assert costs["naive (fine-tuning)"][3:5] == ["0", "0"]
    rows = {(r["metric"], r["experience"]): r for r in read_csv(out / "per_experience.csv")}
    assert float(rows["kld", "1"]["mean"]) == 1.5
    assert float(rows["fd_classifier", "0"]["mean"]) == 10.0
    _, table = markdown_rows((out / "report.md").read_text(), "## At the last")
    assert table["naive (fine-tuning)"][1:] == ["1", "1", "10", "1.5", "20"]
    with Image.open(out / "samples.png") as image:
        assert 250 <= image.size[0] <= 350 and 250 <= image.size[1] <= 420
    groups = report.load_runs([workdir])
    gen, true = report._histogram_data(groups["naive (fine-tuning)"], 1)
    first = continual.build(config, workdir).experiences[1][0]
    assert gen[0, first] == 1.0 and true[0].sum() == pytest.approx(1.0)
