"""Drawing attribution maps over images (matplotlib and numpy only; no torch).

``draw_attribution`` puts an image and a map overlay on an Axes and returns the artists;
``update_attribution`` changes them in place (for widgets: no figure is re-created).
"""
from __future__ import annotations

import textwrap

import numpy as np

#: colour maps offered for overlays; signed maps default to a diverging one
COLORMAPS = ("jet", "inferno", "viridis", "magma", "hot", "gray", "bwr", "coolwarm", "RdBu_r")
DEFAULT_CMAP = "jet"
DEFAULT_SIGNED_CMAP = "bwr"
#: pixel-level maps are shown scaled by this percentile of their magnitude and clipped: a few
#: extreme pixels would otherwise leave the rest of the map invisible
FINE_PERCENTILE = 99.5


def shown_heat(heat, fine: bool = False) -> np.ndarray:
    """What is drawn for a map: the map itself, or for a pixel-level (``fine``) map, the map
    divided by the :data:`FINE_PERCENTILE`-th percentile of its magnitude and clipped to
    [-1, 1]. A display copy only: rankings and maxima read the map itself."""
    heat = np.nan_to_num(np.asarray(heat, dtype=np.float32))
    if not fine or heat.size == 0:
        return heat
    flat = np.abs(heat).ravel()
    k = max(1, min(flat.size, int(np.ceil(FINE_PERCENTILE / 100 * flat.size))))
    scale = np.partition(flat, k - 1)[k - 1]  # the k-th smallest magnitude
    if scale <= 0:
        return heat
    return np.clip(heat / scale, -1.0, 1.0).astype(np.float32)


def _limits(signed: bool):
    return (-1.0, 1.0) if signed else (0.0, 1.0)


def _alpha(heat, alpha: float, fade: bool):
    """Overlay opacity: uniform, or (``fade``) growing with the magnitude so that the zero of a
    signed or pixel-level map leaves the image visible."""
    if not fade:
        return float(alpha)
    return float(alpha) * np.sqrt(np.clip(np.abs(heat), 0.0, 1.0))


def draw_attribution(ax, heat, image=None, *, alpha: float = 0.5, cmap: str | None = None,
                     signed: bool = False, title: str | None = None, fade: bool = False,
                     fine: bool = False) -> dict:
    """Draw ``image`` (H×W×3 in [0, 1]) with ``heat`` (H×W, in [0, 1] or [-1, 1] when
    ``signed``) over it; returns ``{"image", "overlay", "title"}`` artists. ``fade``: the
    overlay's opacity follows the map's magnitude (for signed and pixel-level maps).
    ``fine``: a pixel-level map, drawn through :func:`shown_heat` (and faded)."""
    heat = shown_heat(heat, fine)
    fade = fade or fine
    if image is None:
        image = np.zeros((*heat.shape, 3), dtype=np.float32)
    cmap = cmap or (DEFAULT_SIGNED_CMAP if signed else DEFAULT_CMAP)
    low, high = _limits(signed)
    ax.set_axis_off()
    base = ax.imshow(np.clip(image, 0, 1), interpolation="bilinear")
    over = ax.imshow(heat, cmap=cmap, vmin=low, vmax=high, alpha=_alpha(heat, alpha, fade),
                     interpolation="bilinear")
    text = ax.set_title(title or "", fontsize=9, y=1.0)
    return {"image": base, "overlay": over, "title": text, "signed": signed, "fade": fade,
            "alpha": float(alpha), "fine": fine}


def update_attribution(artists: dict, heat=None, image=None, *, alpha: float | None = None,
                       cmap: str | None = None, signed: bool | None = None,
                       title: str | None = None, fade: bool | None = None,
                       fine: bool | None = None) -> dict:
    """Change the artists made by :func:`draw_attribution` in place (``heat``: the map itself,
    shown through :func:`shown_heat` when it is ``fine``)."""
    over = artists["overlay"]
    if fine is not None:
        artists["fine"] = fine
        fade = fade or fine
    if heat is not None:
        over.set_data(shown_heat(heat, artists.get("fine", False)))
    if fade is not None:
        artists["fade"] = fade
    if alpha is not None:
        artists["alpha"] = float(alpha)
    if image is not None:
        artists["image"].set_data(np.clip(image, 0, 1))
    if signed is not None and signed != artists.get("signed"):
        artists["signed"] = signed
        over.set_clim(*_limits(signed))
    if cmap is not None:
        over.set_cmap(cmap)
    if alpha is not None or heat is not None or fade is not None:
        heat_now = np.asarray(over.get_array())
        a = _alpha(heat_now, artists.get("alpha", 0.5), artists.get("fade", False))
        if np.ndim(a) == 0 and np.ndim(over.get_alpha()) > 0:
            # matplotlib compares a new scalar alpha with the old one, and an old per-pixel
            # alpha makes that comparison fail ("truth value of an array…"): stay per-pixel
            a = np.full(heat_now.shape, a)
        over.set_alpha(a)
    if title is not None:
        artists["title"].set_text(title)
    return artists


def set_message(artists: dict, message: str = "", *, width: int = 30, lines: int = 9) -> None:
    """A message over a panel made by :func:`draw_attribution` (a compared method's error),
    wrapped to the panel's width and cut at ``lines`` lines; an empty message removes it. A
    title cannot hold it: one line of a long error runs over the neighbouring panels."""
    text = artists.get("message")
    if not message:
        if text is not None:
            text.set_text("")
            text.set_visible(False)
        return
    wrapped = textwrap.wrap(" ".join(str(message).split()), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][:width - 1] + "…"
    if text is None:
        ax = artists["image"].axes
        text = artists["message"] = ax.text(
            0.5, 0.5, "", ha="center", va="center", fontsize=8, color="#a40000",
            transform=ax.transAxes, zorder=5,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#e0a0a0",
                  "alpha": 0.92})
    text.set_text("\n".join(wrapped))
    text.set_visible(True)


def blank_panel(ax, message: str = "") -> dict:
    """An empty panel (no method selected) with an optional message."""
    ax.set_axis_off()
    return {"text": ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=9,
                            transform=ax.transAxes)}


def plot_attribution(heat, image=None, ax=None, *, alpha: float = 0.5, cmap: str | None = None,
                     signed: bool = False, title: str | None = None, fade: bool = False,
                     fine: bool = False) -> dict:
    """:func:`draw_attribution` on ``ax``, or on a new pyplot figure when ``ax`` is ``None``."""
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(4, 4), layout="constrained")
    return draw_attribution(ax, heat, image, alpha=alpha, cmap=cmap, signed=signed, title=title,
                            fade=fade, fine=fine)


def attribution_grid(panels, *, columns: int = 4, alpha: float = 0.5, size: float = 3.0):
    """A figure with one panel per ``(heat, image, signed, title)``; returns ``(fig, artists)``."""
    from matplotlib.figure import Figure

    panels = list(panels)
    columns = max(1, min(columns, len(panels)))
    rows = (len(panels) + columns - 1) // columns
    fig = Figure(figsize=(size * columns, size * rows + 0.3), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    artists = []
    for ax, (heat, image, signed, title) in zip(axes, panels):
        artists.append(draw_attribution(ax, heat, image, alpha=alpha, signed=signed, title=title,
                                        fade=signed))
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    return fig, artists


def draw_image(ax, image, title: str | None = None) -> dict:
    """The plain image on ``ax``; returns ``{"image", "title"}`` artists."""
    ax.set_axis_off()
    art = ax.imshow(np.clip(image, 0, 1), interpolation="bilinear")
    return {"image": art, "title": ax.set_title(title or "", fontsize=9, y=1.0)}


def show_panel(artists: dict, visible: bool) -> None:
    """Show or hide every artist of a panel (compare mode with fewer than four methods)."""
    for key in ("image", "overlay", "title"):
        if key in artists:
            artists[key].set_visible(visible)
    if "message" in artists:  # shown again only if it still says something
        artists["message"].set_visible(visible and bool(artists["message"].get_text()))


# ------------------------------------------------------------------ a region of a dense output
def grid_cells(start, end, image_shape, grid) -> tuple[tuple[int, int], tuple[int, int]]:
    """The ``(rows, cols)`` ranges (inclusive) of the cells of a ``grid`` (H'×W' output
    pixels spread evenly over an image of ``image_shape``) that a rectangle dragged from
    ``start`` to ``end`` (image data coordinates ``(x, y)``, pixel centres at integers) touches
    at its two corners; corners beyond the image fall in its border cells."""
    height, width = image_shape[:2]

    def cell(v, size, n):
        return int(np.clip(np.floor((v + 0.5) * n / size), 0, n - 1))

    rows = sorted((cell(start[1], height, grid[0]), cell(end[1], height, grid[0])))
    cols = sorted((cell(start[0], width, grid[1]), cell(end[0], width, grid[1])))
    return tuple(rows), tuple(cols)


def show_cells(artists: dict, rows, cols, grid) -> None:
    """Outline the cells ``rows`` × ``cols`` (inclusive) of a ``grid`` of output pixels spread
    over the image of a panel made by :func:`draw_image` / :func:`draw_attribution` (the
    rectangle is made on the first call, then moved)."""
    from matplotlib.patches import Rectangle

    height, width = artists["image"].get_array().shape[:2]
    sy, sx = height / grid[0], width / grid[1]
    xy = (cols[0] * sx - 0.5, rows[0] * sy - 0.5)
    size = ((cols[1] - cols[0] + 1) * sx, (rows[1] - rows[0] + 1) * sy)
    box = artists.get("region")
    if box is None:
        ax = artists["image"].axes
        box = artists["region"] = Rectangle(xy, *size, fill=False, edgecolor="#00e5ff",
                                            linewidth=1.5, linestyle="--", zorder=4)
        ax.add_patch(box)
    box.set_xy(xy)
    box.set_width(size[0])
    box.set_height(size[1])


class RegionDrag:
    """Click-and-drag on ``ax`` (an image of ``image_shape``) choosing a rectangle of the cells
    of ``grid``: ``on_move(rows, cols)`` whenever the cells under the drag change (from the
    press on), ``on_release(rows, cols)`` when the mouse button is let go. Only the left
    button and only a press inside ``ax`` start a drag; a release outside it ends the drag at
    the last point inside. The callers draw (:func:`show_cells`) from what they keep."""

    def __init__(self, ax, image_shape, grid, on_move, on_release):
        self.ax, self.image_shape, self.grid = ax, tuple(image_shape[:2]), tuple(grid)
        self.on_move, self.on_release = on_move, on_release
        self._start = self._end = self._cells = None
        canvas = ax.figure.canvas
        self._ids = [canvas.mpl_connect("button_press_event", self._press),
                     canvas.mpl_connect("motion_notify_event", self._motion),
                     canvas.mpl_connect("button_release_event", self._release)]

    def _inside(self, event) -> bool:
        return event.inaxes is self.ax and event.xdata is not None

    def _cells_now(self):
        return grid_cells(self._start, self._end, self.image_shape, self.grid)

    def _press(self, event):
        if event.button != 1 or not self._inside(event):
            return
        self._start = self._end = (event.xdata, event.ydata)
        self._cells = self._cells_now()
        self.on_move(*self._cells)

    def _motion(self, event):
        if self._start is None or not self._inside(event):
            return
        self._end = (event.xdata, event.ydata)
        cells = self._cells_now()
        if cells != self._cells:
            self._cells = cells
            self.on_move(*cells)

    def _release(self, event):
        if self._start is None:
            return
        if self._inside(event):
            self._end = (event.xdata, event.ydata)
        cells = self._cells_now()
        self._start = self._end = self._cells = None
        self.on_release(*cells)

    def disconnect(self) -> None:
        """Stop listening to the canvas."""
        for cid in self._ids:
            self.ax.figure.canvas.mpl_disconnect(cid)
        self._ids = []
