"""The demo's plots show every row: no line hidden under another, no legend over data, labelled bars."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from semisparse.cli.demo import Row, accuracy_figure, density_figure  # noqa: E402

LAYERS = ["features.2.weight", "features.5.weight", "classifier.1.weight"]


def _rows() -> list[Row]:
    half = [{"name": n, "density": 0.5} for n in LAYERS]
    tenth = [{"name": n, "density": d} for n, d in zip(LAYERS, (0.08, 0.1, 0.12))]
    return [
        Row("dense", "dense", 97.8, 1.0, 0.0, layers=[{"name": n, "density": 1.0} for n in LAYERS]),
        Row("magnitude 2:4, one-shot", "2:4", 91.4, 0.5, 0.99, layers=half),
        Row("sparsegpt 2:4, one-shot", "2:4", 97.2, 0.5, 0.99, layers=half),
        Row("magnitude 2:4 + fine-tune", "2:4", 97.5, 0.5, 0.99, layers=half),
        Row("learned 2:4, frozen weights", "2:4", 97.6, 0.5, 0.99, layers=half),
        Row("RigL 90%", "unstructured", 95.0, 0.1, 0.9, layers=tenth),
        Row("SRigL 90%", "fan-in", 95.1, 0.1, 0.9, layers=tenth),
    ]


def test_density_lines_that_coincide_stay_distinguishable_and_the_legend_is_outside_the_axes():
    fig = density_figure(_rows())
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 6
    styles = {(ln.get_marker(), ln.get_linestyle()) for ln in lines}
    assert len(styles) == 6  # every line drawn its own way
    xs = {tuple(ln.get_xdata()) for ln in lines}
    assert len(xs) == 6  # and offset sideways, so equal densities do not sit on top of each other
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    axes = ax.get_window_extent()
    assert legend.x0 >= axes.x1  # outside: it covers no data
    assert len(ax.get_legend().get_texts()) == 6
    plt.close(fig)


def test_accuracy_axis_starts_at_a_round_floor_and_bars_carry_their_values():
    rows = _rows()
    fig = accuracy_figure(rows)
    ax = fig.axes[0]
    left, right = ax.get_xlim()
    assert left == 80.0 and right > 100  # below the worst row (91.4) by a margin, a multiple of 10
    labels = sorted(t.get_text() for t in ax.texts)
    assert labels == sorted(f"{r.acc1:.1f}" for r in rows)
    plt.close(fig)
