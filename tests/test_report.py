"""The report: top-1 / top-5 counts and their Wilson intervals, the base_only column, the Optuna
pages and their plotly.min.js, the figures' ticks, titles, styles and legends, and the summary
over run folders (only this tool's runs, grouped by model and data, Pareto per group)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import optuna
import pandas as pd
import plotly.offline
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from torch import nn

from compression import make_config
from train_evaluate.inputs.selection import LayerInfo
from train_evaluate.outputs import figures, report
from train_evaluate.outputs import summary as compare
from train_evaluate.outputs.accounting import Accounting
from train_evaluate.outputs.run_folder import FORMAT
from train_evaluate.search.sweep import SearchSpace, SweepConfig, run_rank
from train_evaluate.training.fc_method import Method
from train_evaluate.training.synthetic import synthetic_features
from train_evaluate.training.training import FeatureSplit, evaluate

# -- counts and intervals ------------------------------------------------------------------------


def test_evaluate_counts_top1_and_top5_as_counted_by_hand():
    # 7 classes; the head is the identity, so these rows are the logits. Label's place in its
    # row's order (0 = highest): row 0: 0 (top-1), row 1: 2 (top-5), row 2: 4 (the 5th: top-5),
    # row 3: 5 (neither), row 4: 6 (neither).
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6],  # label 0
            [1.0, 9, 8, 7, 2, 3, 4],  # label 3 (7 < 9, 8)
            [6.0, 5, 4, 3, 2, 1, 0],  # label 4 (behind 6, 5, 4, 3)
            [6.0, 5, 4, 3, 2, 1, 0],  # label 5
            [0.0, 1, 2, 3, 4, 5, 6],  # label 0 (the lowest)
        ]
    )
    split = FeatureSplit(logits, torch.tensor([0, 3, 4, 5, 0]))
    metrics = evaluate(nn.Identity(), split)
    assert (metrics["n"], metrics["correct"], metrics["correct_top5"]) == (5, 1, 3)
    assert metrics["acc"] == pytest.approx(20.0) and metrics["top5"] == pytest.approx(60.0)


def wilson_by_quadratic(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson bounds as its definition has them: the p where the score statistic
    (k/n - p) / sqrt(p (1 - p) / n) equals +-z, i.e. the roots of
    (1 + z^2/n) p^2 - (2k/n + z^2/n) p + (k/n)^2 = 0."""
    phat = k / n
    roots = np.roots([1 + z * z / n, -(2 * phat + z * z / n), phat * phat])
    low, high = sorted(float(np.real(r)) for r in roots)
    return 100 * low, 100 * high


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (7, 20), (261, 500), (1, 3)])
def test_wilson_interval_matches_its_definition(k, n):
    low, high = report.wilson_interval(k, n)
    expected = wilson_by_quadratic(k, n)
    assert low == pytest.approx(expected[0], abs=1e-9)
    assert high == pytest.approx(expected[1], abs=1e-9)


def test_wilson_interval_holds_the_proportion_at_the_ends():
    for n in (1, 3, 9, 10, 49, 360, 50_000):
        low, high = report.wilson_interval(n, n)
        assert low < 100 * n / n <= high and high == 100.0
        low, high = report.wilson_interval(0, n)
        assert low == 0.0 < high


def test_wilson_interval_known_values():
    assert report.wilson_interval(0, 10) == (0.0, pytest.approx(27.753, abs=1e-3))
    assert report.wilson_interval(10, 10) == pytest.approx((72.247, 100.0), abs=1e-3)
    assert report.wilson_interval(None, 10) == (None, None)


# -- evaluation.csv rows -------------------------------------------------------------------------


def small_problem(name: str = "int1", train: int = 600):
    head, splits = synthetic_features(train, 400, in_features=32, classes=20, test=500)
    return Method.create(name, make_config(name), head, splits.train.features), splits


def accounting(method: Method) -> Accounting:
    head = LayerInfo.of("head", method.head)
    return Accounting((head,), (method.cost,), "fp32", False, False, 0, "head (1 layer)")


def test_every_row_has_top5_and_a_wilson_interval_over_the_test_images():
    method, splits = small_problem("sparse", train=1000)
    # one fixed setting that trains (lr 1e-2): the two final seeds end on different test counts
    space = SearchSpace(lr=(1e-2, 1e-2), optimizers=("Adam",), batch_sizes=(64,), alphas=(16,))
    sweep = SweepConfig(init="svd_init", trials=1, epochs=3, final_seeds=2, space=space)
    trained = run_rank(method, 4, splits, sweep, None, "t").record
    init_only = run_rank(method, 2, splits, SweepConfig(init="svd_init", epochs=0), None, "i")
    original = evaluate(method.head, splits.test)
    compressed = evaluate(method.compressed_model(), splits.test)
    shared = {"quant": "sparse", "init": "svd_init", "seed": 0, "compression": "sparse"}
    rows = report.method_rows(
        shared, original, compressed, method.cost, [init_only.record, trained], accounting(method)
    )
    frame = report.evaluation_frame(rows).set_index("lora_rank")
    n = len(splits.test)
    assert (frame["test_images"] == n).all()

    # the levels: counts of the layers themselves
    for rank, metrics in (("original", original), ("quantized", compressed)):
        assert frame.loc[rank, "top5"] == metrics["top5"]
        low, high = report.wilson_interval(metrics["correct"], n)
        assert (frame.loc[rank, "ci95_test_low"], frame.loc[rank, "ci95_test_high"]) == (low, high)

    # two final seeds: top5 and the count are their means
    finals = trained["finals"]
    assert finals[0]["test_correct"] != finals[1]["test_correct"]
    assert finals[0]["test_top5"] != finals[1]["test_top5"]
    assert frame.loc[4, "top5"] == pytest.approx(np.mean([f["test_top5"] for f in finals]))
    mean_correct = np.mean([f["test_correct"] for f in finals])
    assert frame.loc[4, "evaluation"] == pytest.approx(100 * mean_correct / n)
    low, high = report.wilson_interval(mean_correct, n)
    assert frame.loc[4, "ci95_test_low"] == pytest.approx(low)
    assert frame.loc[4, "ci95_test_high"] == pytest.approx(high)

    # init only: the init's own count, checked against evaluate on the init's layer
    layer = init_only.layer
    init_metrics = evaluate(layer, splits.test.with_base(layer))
    assert frame.loc[2, "top5"] == init_metrics["top5"]
    assert frame.loc[2, "ci95_test_low"] == report.wilson_interval(init_metrics["correct"], n)[0]
    for _, row in frame.iterrows():
        assert row["ci95_test_low"] <= row["evaluation"] <= row["ci95_test_high"]


def test_base_only_is_the_stored_base_of_the_rank_not_the_compressors():
    method, splits = small_problem("int1")
    quantized = evaluate(method.compressed_model(), splits.test)["acc"]
    for init in ("svd_init", "loftq_init"):
        sweep = SweepConfig(init=init, trials=1, epochs=1)
        outcome = run_rank(method, 4, splits, sweep, None, init)
        frame = report.evaluation_frame([report.rank_row(outcome.record, 100.0, 1)])
        stored = outcome.layer.base_layer  # what the packed checkpoint holds as the base
        assert frame["base_only"].iloc[0] == evaluate(stored, splits.test)["acc"], init
        if init == "svd_init":  # the base is the compressor's W_c
            assert frame["base_only"].iloc[0] == quantized
        else:  # loftq refits the base per rank: the quantized row is not what is stored
            assert frame["base_only"].iloc[0] != quantized


# -- per-rank files ------------------------------------------------------------------------------


def test_plotly_bundle_is_written_whole_and_a_damaged_one_is_replaced(tmp_path):
    bundled = plotly.offline.get_plotlyjs().encode("utf-8")
    path = report.write_plotly_bundle(tmp_path)
    assert path.read_bytes() == bundled
    path.write_bytes(bundled[: len(bundled) // 3])  # a copy cut short by a full disk
    report.write_plotly_bundle(tmp_path)
    assert path.read_bytes() == bundled
    damaged = bytearray(bundled)  # same size, one byte changed
    damaged[1000] ^= 0xFF
    path.write_bytes(bytes(damaged))
    report.write_plotly_bundle(tmp_path)
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(bundled).digest()


def study_with(values: list[float]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for index, value in enumerate(values):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": 1e-4 * (index + 1), "batch_size": 32 * (index % 2 + 1)},
                distributions={
                    "lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                    "batch_size": optuna.distributions.CategoricalDistribution([32, 64]),
                },
                value=value,
            )
        )
    return study


def rank_record(method: str = "int1", rank: int = 4) -> dict:
    return {"method": method, "rank": rank, "init": "svd_init", "seed": 0, "finals": []}


INFO = {"model": "resnet18.tv_in1k", "demo": False}


def plotly_layout(page) -> dict:
    """The layout of the figure a plotly page holds (its JSON sits in Plotly.newPlot(...))."""
    text = page.read_text()
    start = text.index("Plotly.newPlot(")
    decoder = json.JSONDecoder()
    # newPlot("id", data, layout, config): skip the id, read the data, then the layout
    position = text.index(",", start) + 1
    _, end = decoder.raw_decode(text[position:].lstrip())
    rest = text[position:].lstrip()[end:].lstrip().removeprefix(",").lstrip()
    layout, _ = decoder.raw_decode(rest)
    return layout


def test_optuna_pages_are_titled_labelled_and_load_a_whole_bundle(tmp_path):
    study = study_with([80.0, 85.0, 83.0, 90.0])
    (tmp_path / "plotly.min.js").write_text("half a file")  # left by an earlier, killed run
    report.write_rank_artifacts(tmp_path, rank_record(), None, study, "fp32", INFO)
    history = tmp_path / "quant=int1_r=4_optimization_history.html"
    importances = tmp_path / "quant=int1_r=4_param_importances.html"
    assert importances in report.rank_artifacts(tmp_path, "int1", 4)
    for page in (history, importances):
        layout = plotly_layout(page)
        title = layout["title"]["text"]
        for part in ("quant=int1", "rank=4", "svd_init", "resnet18.tv_in1k"):
            assert part in title, (page.name, title)
        assert 'src="plotly.min.js"' in page.read_text()
    assert plotly_layout(history)["yaxis"]["title"]["text"] == "val top-1 (%)"
    assert "val top-1 (%)" in plotly_layout(importances)["xaxis"]["title"]["text"]
    bundle = (tmp_path / "plotly.min.js").read_bytes()
    assert bundle == plotly.offline.get_plotlyjs().encode("utf-8")


@pytest.mark.parametrize("values", [[80.0], [85.0, 85.0, 85.0]], ids=["one trial", "no variance"])
def test_no_importance_page_when_it_cannot_be_computed(tmp_path, values):
    report.write_rank_artifacts(tmp_path, rank_record(), None, study_with(values), "fp32", INFO)
    assert (tmp_path / "quant=int1_r=4_optimization_history.html").exists()
    assert not (tmp_path / "quant=int1_r=4_param_importances.html").exists()


def finals(epochs: int) -> list[dict]:
    curve = [80.0 + e for e in range(epochs + 1)]
    history = {"train_acc": curve, "val_acc": curve, "train_loss": curve, "val_loss": curve}
    return [{"history": history, "best_epoch": epochs}]


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_epoch_axis_has_whole_numbers_only(epochs):
    figure = figures.plot_epochs(finals(epochs), "acc", "t")
    FigureCanvasAgg(figure).draw()
    (axes,) = figure.axes
    low, high = axes.get_xlim()
    ticks = [t for t in axes.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_figure_titles_name_the_model_and_the_init():
    assert report.run_title(INFO, "paper_init") == "resnet18.tv_in1k, paper_init"
    assert "digits demo" in report.run_title({"model": "digits_vit", "demo": True}, "svd_init")


# -- the summary over run folders ----------------------------------------------------------------


def rows_of(method: str, init: str, original: float, levels: dict, **extra) -> list[dict]:
    """evaluation.csv rows: original, quantized and ranks (rank -> (accuracy, ratio))."""
    n = 200
    rows = []
    for rank, (accuracy, ratio) in {"original": (original, 1.0), **levels}.items():
        low, high = report.wilson_interval(accuracy * n / 100, n)
        rows.append(
            {"quant": method, "lora_rank": rank, "evaluation": accuracy, "ratio": ratio,
             "init": init, "test_images": n, "ci95_test_low": low, "ci95_test_high": high,
             **extra.get(rank, {})}
        )  # fmt: skip
    return rows


def write_run(folder, model: str, data: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    config = {"model": model, "data": data, "weights": "w"}
    (folder / "run.json").write_text(json.dumps({"format": FORMAT, "config": config}))
    report.write_evaluation(folder, report.evaluation_frame(rows))


@pytest.fixture
def results(tmp_path):
    """Two runs of model A on data X, one of model B on X, and folders that are not runs."""
    levels = {"quantized": (60.0, 20.0), "2": (70.0, 5.0), "4": (75.0, 3.0)}
    # the rank-8 row's fp32 model scores 95 but its packed (fp16) file 80: with the file's
    # accuracy the rank-4 row of svd_init (85 at ratio 4) is on the front, with 95 it is not
    packed = {"8": {"file_evaluation": 80.0}}
    write_run(
        tmp_path / "a" / "X" / "paper_init",
        "a",
        "fx",
        rows_of("int1", "paper_init", 90.0, {**levels, "8": (95.0, 4.5)}, **packed),
    )
    write_run(
        tmp_path / "a" / "X" / "svd_init",
        "a",
        "fx",
        rows_of("int1", "svd_init", 90.0, {**levels, "4": (85.0, 4.0)}),
    )
    # model B: lower accuracies, but its own group: its own front
    write_run(
        tmp_path / "b" / "X" / "svd_init",
        "b",
        "fx",
        rows_of("int1", "svd_init", 50.0, {"quantized": (30.0, 20.0), "2": (45.0, 5.0)}),
    )
    # a folder the tool did not write, with a junk evaluation.csv; a run with an empty one;
    # an evaluation.csv beside a run.json of another format
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "evaluation.csv").write_bytes(b"\x00\xff junk,\n1,2,3\n\xfe")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "run.json").write_text(json.dumps({"format": FORMAT, "config": {}}))
    (tmp_path / "empty" / "evaluation.csv").write_text("")
    (tmp_path / "other").mkdir()
    other = {"format": "someone-else/1", "config": {"model": "a", "data": "fx"}}
    (tmp_path / "other" / "run.json").write_text(json.dumps(other))
    report.write_evaluation(tmp_path / "other", report.evaluation_frame(rows_of("x", "y", 99, {})))
    (tmp_path / "summary_gone_X.png").write_bytes(b"the figure of a group no longer there")
    return tmp_path


def test_summary_only_holds_this_tools_runs_grouped_by_model_and_data(results):
    csv, figures = compare.write_report(results)
    summary = pd.read_csv(csv)
    assert sorted(summary["run"].unique()) == ["a/X/paper_init", "a/X/svd_init", "b/X/svd_init"]
    assert {"run", "model", "data", "pareto"} <= set(summary.columns)
    assert set(summary["data"]) == {"X"}
    assert sorted(p.name for p in figures) == ["summary_a_X.png", "summary_b_X.png"]
    assert sorted(p.name for p in results.glob("summary*.png")) == sorted(p.name for p in figures)
    assert all(p.stat().st_size > 0 for p in figures)


def test_pareto_front_is_per_group_and_uses_the_packed_files_accuracy(results):
    summary = pd.read_csv(compare.write_report(results)[0])
    summary["lora_rank"] = summary["lora_rank"].astype(str)
    row = summary.set_index(["run", "lora_rank"])
    assert row.loc[("a/X/paper_init", "8"), "accuracy"] == 80.0  # the file's, not 95
    assert row.loc[("a/X/svd_init", "4"), "pareto"]  # 85 at 4.0 beats the file's 80 at 4.5
    # model B's rank 2 (45 at ratio 5) is beaten by model A's rows, but not within its group
    assert row.loc[("b/X/svd_init", "2"), "pareto"]
    for _, group in summary.groupby("group"):  # nothing in its group beats a front point
        for _, point in group[group["pareto"]].iterrows():
            at_least = (group["accuracy"] >= point["accuracy"]) & (group["ratio"] >= point["ratio"])
            strictly = (group["accuracy"] > point["accuracy"]) | (group["ratio"] > point["ratio"])
            assert not (at_least & strictly).any()
    # the file row's interval is the Wilson interval of its own count
    low, high = report.wilson_interval(160, 200)
    assert row.loc[("a/X/paper_init", "8"), "accuracy_ci95_low"] == pytest.approx(low, abs=1e-4)
    assert row.loc[("a/X/paper_init", "8"), "accuracy_ci95_high"] == pytest.approx(high, abs=1e-4)


def many_series_frame(runs: int) -> pd.DataFrame:
    frames = []
    for index in range(runs):
        frame = report.evaluation_frame(
            rows_of("int1", f"init{index}", 90.0, {"quantized": (60.0, 20.0), "2": (70.0, 5.0)})
        )
        frame.insert(0, "run", f"m/d/run{index}")
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    frame["lora_rank"] = frame["lora_rank"].astype(str)
    for column in ("file_evaluation", "test_images"):
        frame[column] = pd.to_numeric(frame[column])
    return compare.with_pareto(compare.with_accuracy(frame.assign(group="g")))


def overlaps(one, other) -> bool:
    return not (
        one.x1 <= other.x0 or other.x1 <= one.x0 or one.y1 <= other.y0 or other.y1 <= one.y0
    )


def test_summary_series_are_told_apart_and_the_legend_is_outside_the_data(tmp_path):
    figure = compare.plot_group(many_series_frame(23), "m on d")
    by_rank = figure.axes[0]
    styles = [(c.lines[0].get_color(), c.lines[0].get_marker()) for c in by_rank.containers]
    assert len(styles) == 23 and len(set(styles)) == 23
    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    (legend,) = figure.legends
    for axes in figure.axes:
        assert not overlaps(legend.get_window_extent(renderer), axes.get_window_extent(renderer))
    # the per-run figure too
    frame = many_series_frame(1).drop(columns="run")
    figure = figures.plot_summary(frame, "m, init0")
    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    (legend,) = figure.legends
    (axes,) = figure.axes
    assert not overlaps(legend.get_window_extent(renderer), axes.get_window_extent(renderer))


def test_each_group_figure_draws_its_own_original(results):
    summary = compare.with_pareto(compare.with_accuracy(compare.collect_runs(results)))
    figures = compare.group_figures(summary)
    for name, original in (("summary_a_X", 90.0), ("summary_b_X", 50.0)):
        levels = [
            line.get_ydata()[0]
            for line in figures[name].axes[0].get_lines()
            if line.get_color() == "black" and list(line.get_xdata()) == [0, 1]
        ]
        assert levels == [original], name


def test_series_styles_are_distinct_for_a_hundred_series():
    styles = [tuple(figures.series_style(i).values()) for i in range(100)]
    assert len(set(styles)) == 100


def test_figures_take_an_interval_rounded_to_a_hair_inside_its_value():
    # evaluation.csv holds 6 significant digits: 100 % correct reads back with a high bound of
    # 99.99999..., a hair below the value; a bar of negative length would stop the report
    rows = rows_of("int1", "svd_init", 100.0, {"quantized": (60.0, 20.0), "2": (100.0, 5.0)})
    for row in rows:
        row["ci95_test_high"] = min(row["ci95_test_high"], 99.9999999)
    frame = report.evaluation_frame(rows)
    figures.plot_summary(frame, "m, svd_init")
    frame.insert(0, "run", "m/d/svd_init")
    frame["lora_rank"] = frame["lora_rank"].astype(str)
    compare.plot_group(compare.with_pareto(compare.with_accuracy(frame.assign(group="g"))), "g")
