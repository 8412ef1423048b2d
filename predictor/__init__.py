"""Routing predictors (ExpertFlow-style path network, gate lookahead, baselines) and the token re-batcher.

`moeflow predictor train|eval` trains them on routing traces and scores them on held-out text;
`moeflow generate --policy predictive --predictor NAME` prefetches with one; `--admission rebatch`
groups sequences by predicted experts.
"""

from .base import RoutePredictor, RoutingShape
from .predictors import PREDICTORS

__all__ = ["PREDICTORS", "RoutePredictor", "RoutingShape"]
