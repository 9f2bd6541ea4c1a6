"""The report's figures are readable: legends from the differing settings, 95% CIs labelled where n > 1, no axis
offsets, log axes across a decade, cache names on TPOT bars, a minimum height, training loss and validation."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from kvcompress.evaluation import plots  # noqa: E402
from kvcompress.evaluation.report import Aggregate, RunResult  # noqa: E402

A = "debug=smoke model=vdproj phase=two_stage model.attention_kwargs.rank=0.375"
B = "debug=smoke model=vdproj phase=two_stage model.attention_kwargs.rank=0.625"


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions make, kept open for inspection."""
    made = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: made.append(fig) or path)
    yield made
    plt.close("all")


def rows() -> list[Aggregate]:
    out = []
    for label, ppl in ((A, [443.72, 443.74, 443.73]), (B, [443.70, 443.71, 443.69])):
        out.append(Aggregate(label, 3, {
            "val_ppl": ppl, "cache.bytes_per_token": [2048.0] * 3 if label == A else [3072.0] * 3,
            "val_pos_ppl.0-16": ppl, "val_pos_ppl.16-32": [p * 1.1 for p in ppl],
            "caches.native.tpot_s": [0.010, 0.011, 0.012], "caches.native.bytes_per_token": [2048.0] * 3,
        }))  # fmt: skip
    return out


def test_legends_name_only_the_settings_that_differ():
    names, common = plots.legend_labels([A, B])
    assert names == {A: "rank=0.375", B: "rank=0.625"}
    assert common == "debug=smoke model=vdproj phase=two_stage"
    names, _ = plots.legend_labels(["seed=1", "model=ka"])
    assert names == {"seed=1": "seed=1, model=default", "model=ka": "seed=default, model=ka"}
    assert plots.legend_labels(["baseline", "two_stage"])[0] == {"baseline": "baseline", "two_stage": "two_stage"}


def test_ci95_is_the_t_interval_of_the_mean():
    assert plots.ci95([1.0, 2.0, 3.0]) == pytest.approx(4.303 / math.sqrt(3))
    assert plots.ci95([5.0]) == 0.0


def test_axes_are_plain_and_log_only_across_a_decade():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [443.72, 443.74])
    plots.plain_axis(ax, "y", [443.72, 443.74])
    fig.canvas.draw()
    assert ax.get_yscale() == "linear" and ax.yaxis.get_offset_text().get_text() == ""
    assert not any("e" in t.get_text() for t in ax.get_yticklabels())
    plots.plain_axis(ax, "y", [400.0, 52000.0])
    assert ax.get_yscale() == "log"
    plt.close(fig)


def test_ppl_vs_bytes_has_labelled_error_bars_and_no_offset(tmp_path, figures):
    plots.plot_ppl_vs_bytes(rows(), tmp_path / "p.png")
    (ax,) = figures[0].axes
    figures[0].canvas.draw()
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert any(t.startswith("rank=0.375: run cache, val PPL (n=3)") for t in texts), texts
    assert "95% CI" in legend.get_title().get_text()
    assert ax.yaxis.get_offset_text().get_text() == ""
    assert "debug=smoke model=vdproj phase=two_stage" in " ".join(t.get_text() for t in ax.texts)


def test_tpot_bars_carry_cache_names_and_keep_a_minimum_height(tmp_path, figures):
    plots.plot_tpot(rows()[:1], tmp_path / "t.png")
    fig = figures[0]
    assert fig.get_size_inches()[1] >= plots.MIN_HEIGHT
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["native"]
    assert any(t.get_text().strip().startswith("native: 11.00 ms") for t in ax.texts)


def test_training_curves_show_training_loss_and_validation_by_step(tmp_path, figures):
    runs = []
    for seed in (1, 2):
        folder = tmp_path / f"run{seed}"
        (folder / "csv").mkdir(parents=True)
        lines = ["step,recon/train_loss,recon/val_ppl,lm/train_loss,lm/val_ppl"]
        lines += [f"{s},{2.0 - 0.1 * s + 0.01 * seed},,," for s in range(4)] + [f"3,,{900 + seed},,"]
        lines += [f"{s},,,{5.0 - 0.1 * s},," for s in range(4, 8)] + [f"7,,,,{800 + seed}"]
        (folder / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")
        runs.append(RunResult(folder, A, seed, {}))
    plots.plot_training_curves(runs, tmp_path / "c.png")
    loss_ax, val_ax = figures[0].axes
    assert loss_ax.get_ylabel().startswith("training loss") and val_ax.get_ylabel() == "validation PPL"
    steps = sorted({x for line in loss_ax.get_lines() for x in line.get_xdata()} - {3, 4})
    assert steps == [0, 1, 2, 5, 6, 7]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["all runs (n=2)"]
    assert {t.get_text().strip() for t in loss_ax.texts} >= {"recon", "lm"}  # where each stage starts
