"""FeatureMapExplorer without a browser: traitlets and clicks change the figure's data."""
from __future__ import annotations

import numpy as np
import pytest
import traitlets
from matplotlib.backend_bases import MouseEvent
from PIL import Image

import cnnwidgets as cw
from cnnwidgets.engine.hooks import hook_count

from conftest import assert_same_state, snapshot


@pytest.fixture(scope="module")
def explorer(lite0, cat):
    return cw.FeatureMapExplorer(lite0, cat, layer="_blocks.2")


def _grid(w):
    return np.ma.getdata(w._grid_artist.get_array()).copy()


def _overlay(w):
    return np.ma.getdata(w._overlay.get_array()).copy()


def _click(w, ax, x, y):
    """Simulate a mouse click at data coordinates (x, y) of ``ax``."""
    w.canvas.draw()
    px, py = ax.transData.transform((x, y))
    event = MouseEvent("button_press_event", w.canvas, px, py, button=1)
    w.canvas.callbacks.process("button_press_event", event)


def test_layer_change_changes_the_grid(explorer):
    explorer.layer = "_blocks.2"
    before = _grid(explorer)
    explorer.layer = "_blocks.5"
    after = _grid(explorer)
    assert before.shape != after.shape or not np.allclose(before, after, equal_nan=True)
    assert explorer._layer_box.value == "_blocks.5"
    fm = explorer.maps
    assert fm.layer == "_blocks.5"
    # the grid is sorted strongest mean first and the first tile is that channel's map
    top = int(fm.order("mean")[0])
    assert explorer.channel == top
    h, w = fm.grid
    np.testing.assert_allclose(after[:h, :w], fm.maps[top])


def test_channel_change_changes_the_enlarged_map(explorer):
    explorer.layer = "_blocks.5"
    explorer.channel = 3
    before = _overlay(explorer)
    explorer.channel = 4
    after = _overlay(explorer)
    np.testing.assert_allclose(after, explorer.maps.maps[4])
    assert not np.allclose(before, after)


def test_click_on_a_tile_selects_its_channel(explorer):
    explorer.layer = "_blocks.5"
    layout = explorer._layout_grid
    x, y = layout.origin(2)  # third tile: the third-strongest channel
    _click(explorer, explorer.ax_grid, x + layout.w / 2, y + layout.h / 2)
    assert explorer.errors.last_error is None
    assert explorer.channel == int(explorer.maps.order("mean")[2])


def test_click_on_the_map_picks_a_position_and_the_bars_follow(explorer):
    explorer.layer = "_blocks.5"
    h, w = explorer.maps.grid
    H, W = explorer.display_image.shape[:2]
    _click(explorer, explorer.ax_map, (w - 1.5) * W / w, 0.5 * H / h)  # top-right cell
    assert explorer.position == (0, w - 2)
    channels, values = explorer.maps.top_channels(0, w - 2, 10)
    widths = [bar.get_width() for bar in explorer._bars]
    np.testing.assert_allclose(widths, values)
    # clicking the first bar jumps to the channel that fires most there
    _click(explorer, explorer.ax_bars, max(values[0] / 2, 1e-3), 0)
    assert explorer.channel == int(channels[0])


def test_paging_for_layers_over_a_thousand_channels(explorer):
    explorer.layer = "_conv_head"  # 1,280 channels → two pages of 640
    assert explorer.pages == 2 and explorer.page_size == 640
    first = _grid(explorer)
    last_channel = int(explorer.maps.order("mean")[-1])
    explorer.channel = last_channel  # on page 2: the grid turns the page
    assert explorer.page == 1
    assert not np.array_equal(first, _grid(explorer), equal_nan=True)
    with pytest.raises(traitlets.TraitError, match="page 5"):
        explorer.page = 5


def test_sort_order_changes_the_grid(explorer):
    explorer.layer = "_blocks.5"
    before = _grid(explorer)
    explorer.sort = "index"
    h, w = explorer.maps.grid
    np.testing.assert_allclose(_grid(explorer)[:h, :w], explorer.maps.maps[0])
    assert not np.array_equal(before, _grid(explorer), equal_nan=True)
    explorer.sort = "mean"


def test_bad_values_are_refused_and_state_kept(explorer):
    explorer.layer = "_blocks.5"
    with pytest.raises(traitlets.TraitError, match="did you mean"):
        explorer.layer = "_blocks.55"
    assert explorer.layer == "_blocks.5"
    with pytest.raises(traitlets.TraitError, match="out of range"):
        explorer.channel = 10_000
    with pytest.raises(traitlets.TraitError, match="outside"):
        explorer.position = (999, 0)


def test_callback_errors_show_inside_the_widget(explorer, monkeypatch):
    explorer.layer = "_blocks.5"

    def broken(*args, **kwargs):
        raise RuntimeError("the engine failed")

    monkeypatch.setattr("cnnwidgets.widgets.feature_maps.feature_maps", broken)
    explorer._layer_box.value = "_blocks.6"  # what a user's click on the dropdown does
    assert isinstance(explorer.errors.last_error, RuntimeError)
    assert "the engine failed" in explorer.errors.value
    assert explorer.errors.layout.display != "none"
    assert explorer.layer == "_blocks.5" and explorer._layer_box.value == "_blocks.5"
    monkeypatch.undo()
    explorer._layer_box.value = "_blocks.6"
    assert explorer.layer == "_blocks.6" and explorer.errors.last_error is None


def test_save_writes_the_figure(explorer, tmp_path):
    path = tmp_path / "maps.png"
    explorer.save(path)
    # the PNG is the figure at its own size and resolution (inches × dots per inch)
    w, h = explorer.figure.get_size_inches() * explorer.figure.dpi
    assert Image.open(path).size == (round(w), round(h))
    explorer.save(path, dpi=2 * explorer.figure.dpi)  # a dpi given scales it
    assert Image.open(path).size == (round(2 * w), round(2 * h))


def test_widget_leaves_model_unchanged(lite0, cat):
    before = snapshot(lite0.module)
    w = cw.FeatureMapExplorer(lite0, cat)
    w.layer = lite0.layers()[0]
    w.channel = 1
    assert hook_count(lite0.module) == 0
    assert_same_state(lite0.module, before)


def test_explorer_tabs_build_on_first_view(lite0, cat, tmp_path):
    ex = cw.Explorer(lite0, cat)
    assert ex.titles[0] == "Feature maps"
    assert list(ex.views) == ["Feature maps"]  # only the first tab is built
    fmx = ex.show("Feature maps")
    assert isinstance(fmx, cw.FeatureMapExplorer)
    ex.save(tmp_path / "tab.png")
    assert (tmp_path / "tab.png").stat().st_size > 0


@pytest.mark.parametrize("image_frames", [True, False], ids=["image", "canvas"])
def test_a_state_shown_before_gets_its_pixels_back(lite0, cat, image_frames):
    # switching back to a layer (channel, position, sort, page) shown before puts back the
    # frame kept for it instead of drawing: it must be the one a whole draw gives now
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    w = cw.FeatureMapExplorer(lite0, cat, layer="_blocks.2")
    canvas = w.canvas
    canvas.image_frames = image_frames
    rendered = lambda: np.asarray(canvas.get_renderer().buffer_rgba())[..., :3].copy()  # noqa: E731
    if image_frames:  # what the page shows: the frame image
        shown = lambda: np.asarray(Image.open(io.BytesIO(canvas.frame_image.value)))  # noqa: E731
    else:  # the canvas's own pixels
        shown = rendered
    canvas.draw()
    first = shown()
    w.layer = "_blocks.5"
    canvas.draw()
    assert not (shown() == first).all()
    drawn = []
    for ax in w.figure.axes:
        ax.draw = lambda renderer, ax=ax, inner=ax.draw: (drawn.append(ax), inner(renderer))[1]
    w.layer = "_blocks.2"
    canvas.draw()
    assert drawn == []  # nothing drawn: the kept frame
    back = shown()
    assert (back == first).all()
    FigureCanvasAgg.draw(canvas)  # the reference: the whole figure drawn anew
    assert (rendered() == back).all()
    canvas.draw()
    w.channel = int(w.maps.order("mean")[3])  # a new state: drawn
    canvas.draw()
    assert set(drawn) == set(w.figure.axes)