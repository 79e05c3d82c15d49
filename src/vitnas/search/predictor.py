"""An accuracy predictor: arch encoding -> score, fitted on the candidates a search has evaluated.

`strategies.PredictorEvolutionSearch` uses it the way predictor-guided NAS does (NSGANetV2,
AttentiveNAS, once-for-all's accuracy predictor): each generation proposes many more archs than it
evaluates, with evolution's own operators, and evaluates only the ones the predictor ranks highest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vitnas.space.arch import ArchConfig
from vitnas.space.space import SearchSpace

__all__ = ["MIN_FIT", "PREDICTORS", "AccuracyPredictor", "encode_archs"]

PREDICTORS = ("gbr", "rf", "mlp")  # gradient-boosted trees | random forest | a small MLP (scikit-learn)
MIN_FIT = 8  # fewest evaluated candidates the predictor is fitted on; before that, plain evolution


def encode_archs(archs: Sequence[ArchConfig], space: SearchSpace) -> np.ndarray:
    """(N, F) features in [0, 1] of archs of `space` (the space's `features`: ViT widths, depths, ratios
    and heads, or MBConv depths, kernels and expansions)."""
    return space.features(archs)


class AccuracyPredictor:
    """`fit(archs, scores)`, `predict(archs)`: a scikit-learn regressor on `encode_archs` features.
    Seeded: the same data gives the same predictions."""

    def __init__(self, space: SearchSpace, kind: str = "gbr", seed: int = 0) -> None:
        if kind not in PREDICTORS:
            raise ValueError(f"predictor={kind!r}; expected one of {list(PREDICTORS)}")
        self.space, self.kind, self.seed = space, kind, seed
        self.model: Any = None

    def _new_model(self) -> Any:
        if self.kind == "gbr":
            from sklearn.ensemble import GradientBoostingRegressor

            return GradientBoostingRegressor(
                n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8, random_state=self.seed
            )
        if self.kind == "rf":
            from sklearn.ensemble import RandomForestRegressor

            return RandomForestRegressor(n_estimators=300, min_samples_leaf=2, random_state=self.seed, n_jobs=1)
        from sklearn.neural_network import MLPRegressor
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        mlp = MLPRegressor(
            hidden_layer_sizes=(64, 64), alpha=1e-3, max_iter=3000, early_stopping=False, random_state=self.seed
        )
        return make_pipeline(StandardScaler(), mlp)

    def fit(self, archs: Sequence[ArchConfig], scores: Sequence[float]) -> AccuracyPredictor:
        if len(archs) != len(scores) or len(archs) < 2:
            raise ValueError(f"predictor fit: {len(archs)} archs and {len(scores)} scores; expected 2+ pairs")
        y = np.asarray(scores, dtype=float)
        self._mean, self._std = float(y.mean()), float(y.std()) or 1.0
        self.model = self._new_model()
        self.model.fit(encode_archs(archs, self.space), (y - self._mean) / self._std)
        return self

    def predict(self, archs: Sequence[ArchConfig]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("predictor: fit it before predicting")
        return self.model.predict(encode_archs(archs, self.space)) * self._std + self._mean
