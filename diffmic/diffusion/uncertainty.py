"""How uncertain is each prediction? The candidate measures, each a pure function of an image's chains and
of its DCG's probabilities, larger meaning less certain.

From the chains (several per image, `eval.n_samples` > 1), as CARD (Han et al., NeurIPS 2022) measures the
uncertainty of a diffusion classifier:
- interval_width: the width of the central 95% interval of the predicted class's final state across chains
  (CARD's prediction interval width, PIW);
- t_test: the p-value of the paired two-sample t-test between the two classes with the largest mean final
  state, across chains (large: the chains do not tell the two apart);
- disagreement: the share of chains whose own argmax is not the prediction;
- spread: the standard deviation of the predicted class's final state across chains;
- entropy: the entropy of the prediction's probabilities, over log C (0..1).

From the DCG's own probabilities (no chain needed):
- dcg_entropy: the entropy of the DCG's softmax, over log C (0..1);
- dcg_max_prob: 1 - the DCG's largest probability.

`eval.uncertainty` names the one a run reports and flags with (the config reads the names from here); an
evaluation's metrics.json gives every available measure's AUROC beside it. Pure numpy (scipy for the t
distribution), imported on first use: the config reads the names without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class ChainOutputs:
    """What the measures read, for N images: every chain's final state and the two probability vectors."""

    y0: np.ndarray | None  # (N, n_samples, C); None without chains (the `basic` variant)
    probs: np.ndarray  # (N, C) the prediction's probabilities (the diffusion's, or the classifier's)
    dcg_probs: np.ndarray  # (N, C) the DCG's softmax

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)

    def predicted_class_states(self) -> np.ndarray:
        """(N, n_samples): every chain's final state of the predicted class."""
        import numpy as np

        return np.take_along_axis(self.y0, self.predicted[:, None, None], axis=2)[..., 0]


def _normalised_entropy(probs: np.ndarray) -> np.ndarray:
    import numpy as np

    probs = np.clip(probs.astype(np.float64), 0.0, None)
    probs = probs / probs.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(probs), 0.0)
    return -terms.sum(axis=1) / np.log(probs.shape[1])


def interval_width(outputs: ChainOutputs, coverage: float = 0.95) -> np.ndarray:
    import numpy as np

    states = outputs.predicted_class_states()
    tail = (1.0 - coverage) / 2 * 100
    low, high = np.percentile(states, [tail, 100 - tail], axis=1)
    return high - low


def t_test(outputs: ChainOutputs) -> np.ndarray:
    """Two-sided p-value of the paired t-test of the top two classes' states across chains (n - 1 degrees of
    freedom). Chains that all agree exactly give 0 when the top class leads and 1 when the two tie."""
    import numpy as np
    from scipy.stats import t as student_t

    y0 = outputs.y0.astype(np.float64)
    top_two = np.argsort(-y0.mean(axis=1), axis=1, kind="stable")[:, :2]
    first = np.take_along_axis(y0, top_two[:, None, :1], axis=2)[..., 0]
    second = np.take_along_axis(y0, top_two[:, None, 1:], axis=2)[..., 0]
    differences = first - second
    chains = differences.shape[1]
    mean, deviation = differences.mean(axis=1), differences.std(axis=1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        statistic = np.abs(mean) / (deviation / np.sqrt(chains))
    statistic = np.where(deviation > 0, statistic, np.where(np.abs(mean) > 0, np.inf, 0.0))
    return 2 * student_t.sf(statistic, df=chains - 1)


def disagreement(outputs: ChainOutputs) -> np.ndarray:
    return (outputs.y0.argmax(axis=2) != outputs.predicted[:, None]).mean(axis=1)


def spread(outputs: ChainOutputs) -> np.ndarray:
    return outputs.predicted_class_states().std(axis=1, ddof=1)


def entropy(outputs: ChainOutputs) -> np.ndarray:
    return _normalised_entropy(outputs.probs)


def dcg_entropy(outputs: ChainOutputs) -> np.ndarray:
    return _normalised_entropy(outputs.dcg_probs)


def top_label_uncertainty(probs: np.ndarray) -> np.ndarray:
    """1 - max probability: the uncertainty of a model that gives one probability vector."""
    import numpy as np

    return 1.0 - np.asarray(probs, dtype=np.float64).max(axis=1)


def dcg_max_prob(outputs: ChainOutputs) -> np.ndarray:
    return top_label_uncertainty(outputs.dcg_probs)


@dataclass(frozen=True)
class Measure:
    function: Callable[[ChainOutputs], np.ndarray]
    needs_chains: bool  # several chains per image
    within_one: bool  # its values lie in [0, 1], so a threshold above 1 flags nothing
    description: str


# Declared in the order the README's table compares them.
MEASURES: dict[str, Measure] = {
    "interval_width": Measure(interval_width, True, False, "width of the 95% interval of the predicted class's "
                                                           "state across chains (CARD's PIW)"),
    "t_test": Measure(t_test, True, True, "p-value of the paired t-test between the top two classes across chains"),
    "disagreement": Measure(disagreement, True, True, "share of chains that disagree with the prediction"),
    "spread": Measure(spread, True, False, "standard deviation of the predicted class's state across chains"),
    "entropy": Measure(entropy, False, True, "entropy of the prediction's probabilities over log C"),
    "dcg_entropy": Measure(dcg_entropy, False, True, "entropy of the DCG's probabilities over log C"),
    "dcg_max_prob": Measure(dcg_max_prob, False, True, "1 - the DCG's largest probability"),
}


UNCERTAINTY_MEASURES = tuple(MEASURES)


def uncertainty(name: str, outputs: ChainOutputs) -> np.ndarray:
    """(N,) the named measure; ValueError for an unknown name or a chain measure without several chains."""
    import numpy as np

    if name not in MEASURES:
        raise ValueError(f"unknown uncertainty measure {name!r}; expected one of {', '.join(MEASURES)}")
    measure = MEASURES[name]
    if measure.needs_chains and (outputs.y0 is None or outputs.y0.shape[1] < 2):
        raise ValueError(f"the uncertainty measure {name!r} needs several chains per image (eval.n_samples > 1)")
    return np.asarray(measure.function(outputs), dtype=np.float64)


def available_measures(outputs: ChainOutputs) -> list[str]:
    """The measures these outputs allow: the chain measures only with several chains per image."""
    chains = outputs.y0 is not None and outputs.y0.shape[1] > 1
    return [name for name, measure in MEASURES.items() if chains or not measure.needs_chains]
