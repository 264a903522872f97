"""Drawing: matplotlib and numpy only, no torch (the engine hands arrays over).

Every title is placed with ``y=1.0``: without it matplotlib measures the tick labels of every
axes on each redraw to place it (measured: ~30 ms of a 175 ms feature-map-explorer redraw).
Axes here carry no ticks above them, so the title lands where it would anyway.
"""
