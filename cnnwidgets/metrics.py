"""How good is an attribution map? (``cw.metrics``)

    curve = cw.metrics.deletion(model, image, "grad_cam")   # lower area is better
    curve = cw.metrics.insertion(model, image, attribution)  # higher area is better
    curve.plot()
    cw.metrics.pointing_game(attribution, (x0, y0, x1, y1))
    cw.metrics.sanity_check(model, image, "guided_backprop").plot()

See :mod:`cnnwidgets.engine.metrics` for the definitions.
"""
from .engine.metrics import (
    Curve,
    PointingGame,
    SanityCheck,
    deletion,
    insertion,
    pointing_game,
    sanity_check,
    spearman,
    weighted_layers,
)

__all__ = ["Curve", "PointingGame", "SanityCheck", "deletion", "insertion", "pointing_game",
           "sanity_check", "spearman", "weighted_layers"]
