"""Area under pixel deletion or insertion curves as an ``evaluate`` metric.

Load it offline from the installed package (no Hub):

    import evaluate
    from bcos_hf.evaluation import metric_path
    auc = evaluate.load(metric_path("perturbation_auc"))
    auc.compute(predictions=curves)

``predictions``: one curve per image, the model's score after 0, 1/steps, ..., 1 of the pixels were deleted
(or inserted), e.g. from ``bcos_hf.faithfulness.perturbation_curves``. Returns the mean area under the curves
(trapezoids over [0, 1]; ``bcos_hf.faithfulness.area_under_curve``), its standard deviation and the count
(Petsiuk et al., RISE, BMVC 2018, Sec. 4.1: deletion lower is better, insertion higher is better).
"""

from __future__ import annotations

import datasets
import evaluate

from bcos_hf.faithfulness import area_under_curve


class PerturbationAuc(evaluate.Metric):
    """Mean area under deletion or insertion curves."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Petsiuk, Das, Saenko. RISE: Randomized Input Sampling for Explanation of Black-box Models. "
            "BMVC 2018.",
            inputs_description="predictions: one score curve per image, at evenly spaced shares of the pixels.",
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, predictions) -> dict[str, float]:
        areas = area_under_curve(predictions)
        return {
            "auc": float(areas.mean()),
            "auc_std": float(areas.std()) if len(areas) > 1 else 0.0,
            "count": len(areas),
        }
