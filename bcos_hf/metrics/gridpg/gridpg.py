"""GridPG as an ``evaluate`` metric: the share of positive attribution inside the cell each map should point at.

Load it offline from the installed package (no Hub):

    import evaluate
    from bcos_hf.evaluation import metric_path
    gridpg = evaluate.load(metric_path("gridpg"))
    gridpg.compute(predictions=maps, references=cells, grid=2, smoothing=15)

``predictions``: one attribution map per explained cell, (grid H) x (grid W) (a nested list or an array);
``references``: the index of that cell, row by row. Returns the mean score, its standard deviation and the
number of maps. The scores are ``bcos_hf.localisation.pointing_scores`` (Böhle et al., CoDA-Nets, CVPR 2021,
Sec. 5.1): 1 = every bit of positive attribution in the right cell, 1/grid² = chance.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
import torch

from bcos_hf.localisation import pointing_scores


class Gridpg(evaluate.Metric):
    """Grid pointing game score of attribution maps over grids of images."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Böhle, Fritz, Schiele. Convolutional Dynamic Alignment Networks for Interpretable "
            "Classifications. CVPR 2021.",
            inputs_description="predictions: attribution maps (grid H x grid W); references: each map's cell index.",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
                    "references": datasets.Value("int32"),
                }
            ),
        )

    def _compute(self, predictions, references, grid: int = 2, smoothing: int = 15) -> dict[str, float]:
        maps = torch.as_tensor(np.asarray(predictions, dtype=np.float32))
        scores = pointing_scores(maps, grid, smoothing, cells=references).double()
        return {
            "gridpg": float(scores.mean()),
            "gridpg_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "count": len(scores),
        }
