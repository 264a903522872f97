"""The browser tests' "does this figure look drawn?" check, on figures drawn here with Agg.

``figtags`` says where each axes is (in the browser tests: as classes on the ipympl canvas)
and ``browserkit.judge_drawn`` judges the pixels there. No browser needed: the same two
functions run on a PNG rendered in this process.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import browserkit as bk
import figtags


def shot(fig) -> bk.FigureShot:
    """``fig`` as the browser test sees it: its pixels and its figtags."""
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    return bk.FigureShot.parse(buf.getvalue(), figtags.figure_tags(fig, canvas.get_renderer()))


def image_figure(data=None, **kw):
    fig = Figure(figsize=(3, 2), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(np.random.default_rng(0).random((8, 8)) if data is None else data, **kw)
    ax.set_title("a title, ticks and labels are not a drawing")
    return fig, ax, image


def curves_figure():
    fig = Figure(figsize=(4, 3), dpi=100)
    ax = fig.add_subplot()
    (line,) = ax.plot([0, 0.5, 1], [1, 0.2, 0.1], color="tab:red", lw=1.8,
                      label="deletion — AUC 0.321")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    ax.set_xlabel("fraction of pixels removed")
    return fig, ax, line


def test_an_image_looks_drawn():
    s = shot(image_figure()[0])
    assert [k for k, *_ in s.regions] == ["i"]
    assert bk.judge_drawn(s) is None


def test_hidden_image_leaves_empty_axes_with_ticks_that_do_not_look_drawn():
    fig, _, image = image_figure()
    image.set_visible(False)
    s = shot(fig)
    assert [k for k, *_ in s.regions] == ["p"]
    assert "plot axes are empty" in bk.judge_drawn(s)
    # the same figure, judged as a whole, has plenty of pixels: that is why the axes matter
    assert bk.looks_drawn(s.png)


@pytest.mark.parametrize("value", [0.0, 0.7])
def test_a_flat_image_does_not_look_drawn(value):
    """A map of one value in a colour map: one flat colour (dark purple, or green), not white."""
    s = shot(image_figure(np.full((8, 8), value), vmin=0, vmax=1)[0])
    assert "one flat colour" in bk.judge_drawn(s)


def test_a_faint_image_looks_drawn():
    """Low contrast is still a picture: half the pixels a shade (~15 levels) away."""
    data = np.zeros((8, 8))
    data[:, 4:] = 1.0
    s = shot(image_figure(data, cmap="gray", vmin=-16, vmax=1)[0])
    assert bk.judge_drawn(s) is None


def test_curves_look_drawn_and_legend_and_grid_alone_do_not():
    fig, ax, line = curves_figure()
    s = shot(fig)
    assert [k for k, *_ in s.regions] == ["p"] and len(s.excluded) == 1
    assert bk.judge_drawn(s) is None
    line.remove()  # the legend keeps its sample of the line; the grid stays
    s = shot(fig)
    assert "plot axes are empty" in bk.judge_drawn(s)


def test_bars_look_drawn():
    fig = Figure(figsize=(2.5, 3), dpi=100)
    ax = fig.add_subplot()
    ax.barh(range(5), [5.6, 5.3, 4.9, 4.8, 4.3])
    assert bk.judge_drawn(shot(fig)) is None


def test_every_kind_of_axes_must_look_drawn():
    """A picture beside empty plot axes is not a drawn figure."""
    fig = Figure(figsize=(5, 2), dpi=100)
    left, right = fig.subplots(1, 2)
    left.imshow(np.random.default_rng(1).random((8, 8)))
    right.plot([])
    assert "plot axes are empty" in bk.judge_drawn(shot(fig))


def test_a_figure_without_axes_or_tags_does_not_look_drawn():
    fig = Figure(figsize=(2, 2))
    fig.text(0.5, 0.5, "text only")
    assert bk.judge_drawn(shot(fig)) == "the figure has no visible axes"
    assert "never drawn" in bk.judge_drawn(bk.FigureShot(shot(fig).png))


def test_image_region_is_where_the_image_lies():
    """An 8 x 8 image (aspect equal) in a wide figure occupies a square; with the x range
    doubled, only the left half of the axes."""
    fig, ax, _ = image_figure()
    s = shot(fig)
    (_, x0, y0, x1, y1), = s.regions
    w, h = (x1 - x0) * 300, (y1 - y0) * 200  # pixels
    assert abs(w - h) <= 2
    ax.set_xlim(-0.5, 15.5)
    ax.set_aspect("auto")
    s = shot(fig)
    (_, ix0, _, ix1, _), = s.regions
    box = ax.get_position()
    assert ix0 == pytest.approx(box.x0, abs=2e-3)
    assert ix1 - ix0 == pytest.approx(box.width / 2, abs=2e-3)


def test_install_tags_ipympl_canvases_on_every_draw():
    from cnnwidgets.widgets.base import make_figure

    draw = Figure.draw
    try:
        figtags.install()
        figtags.install()  # twice: still one wrapper
        assert Figure.draw.__wrapped__ is draw
        fig, canvas = make_figure(3, 2)
        image = fig.add_subplot().imshow(np.eye(4))
        canvas.draw()
        first = [c for c in canvas._dom_classes if c.startswith("cwfig-")]
        assert len(first) == 1
        assert any(c.startswith("cwax-i-") for c in canvas._dom_classes)
        image.set_visible(False)
        canvas.draw()
        assert [c for c in canvas._dom_classes if c.startswith("cwfig-")] == first
        assert any(c.startswith("cwax-p-") for c in canvas._dom_classes)
        assert not any(c.startswith("cwax-i-") for c in canvas._dom_classes)
    finally:
        Figure.draw = draw


def test_a_figure_appearing_or_going_away_is_no_change():
    """Figures are matched by their figtags identity: only a figure shown before and after
    can have changed."""
    fig, _, image = image_figure()
    first = shot(fig)
    other = shot(curves_figure()[0])
    assert first.key != other.key
    assert bk.figure_change([first], [first, other]) == 0.0   # one appeared
    assert bk.figure_change([first, other], [other]) == 0.0   # one went away
    assert bk.figure_change([first], [other]) == 0.0          # replaced by another
    image.set_data(np.random.default_rng(5).random((8, 8)))
    changed = shot(fig)
    assert changed.key == first.key
    assert bk.figure_change([first], [changed, other]) > bk.CHANGED
    assert bk.figure_change([first, other], [changed, other], key=other.key) == 0.0
