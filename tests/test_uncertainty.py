"""Each uncertainty measure on hand-made chains whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffmic.diffusion.uncertainty import MEASURES, ChainOutputs, available_measures, uncertainty


def outputs(y0: list, dcg_probs: list | None = None) -> ChainOutputs:
    """Probabilities as the positive_part rule makes them from the chains' mean state."""
    y0 = np.asarray(y0, dtype=np.float64)
    state = np.clip(y0.mean(axis=1), 0, None)
    probs = state / state.sum(axis=1, keepdims=True)
    dcg = np.asarray(dcg_probs, dtype=np.float64) if dcg_probs is not None else probs
    return ChainOutputs(y0, probs, dcg)


# Image 0: four chains that agree exactly on class 0. Image 1: chains split 2-2 between classes 0 and 1.
AGREE = [[1.0, 0.0, 0.0]] * 4
SPLIT = [[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.2, 0.8, 0.0], [0.15, 0.85, 0.0]]


def test_disagreement_is_the_share_of_chains_against_the_prediction():
    values = uncertainty("disagreement", outputs([AGREE, SPLIT]))
    # Image 1's mean state is (0.5125, 0.4875, 0): it predicts class 0, two chains of four say class 1.
    assert values.tolist() == [0.0, 0.5]


def test_interval_width_is_the_central_95_percent_of_the_predicted_class():
    y0 = [[[v, 1 - v] for v in np.linspace(0.0, 1.0, 101)]]  # 101 chains, class 0 uniform on [0, 1]
    width = uncertainty("interval_width", outputs(y0))
    assert width[0] == pytest.approx(0.95)
    assert uncertainty("interval_width", outputs([AGREE]))[0] == 0.0


def test_spread_is_the_sample_std_of_the_predicted_class():
    y0 = [[[1.0, 0.0], [3.0, 0.0]]]  # class 0 states 1 and 3: sample std sqrt(2)
    assert uncertainty("spread", outputs(y0))[0] == pytest.approx(math.sqrt(2))


def test_t_test_p_value_against_scipy_and_its_limits():
    from scipy.stats import ttest_rel

    y0 = np.array([[[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.9, 0.1, 0.0], [0.6, 0.5, -0.1]]])
    expected = ttest_rel(y0[0, :, 0], y0[0, :, 1]).pvalue
    assert uncertainty("t_test", outputs(y0))[0] == pytest.approx(expected)
    # Chains that all agree: a top class that leads is certain (p 0); two tied classes are not (p 1).
    tied = [[0.5, 0.5, 0.0]] * 4
    assert uncertainty("t_test", outputs([AGREE, tied])).tolist() == [0.0, 1.0]
    # The split image's top two are nearly tied across chains: a large p-value.
    assert uncertainty("t_test", outputs([SPLIT]))[0] > 0.9


def test_entropies_are_normalised_to_one_for_a_uniform_vector():
    uniform, certain = [1 / 3] * 3, [1.0, 0.0, 0.0]
    data = outputs([AGREE, AGREE], dcg_probs=[uniform, certain])
    assert uncertainty("entropy", data).tolist() == [0.0, 0.0]
    assert uncertainty("dcg_entropy", data) == pytest.approx([1.0, 0.0])
    assert uncertainty("dcg_max_prob", data) == pytest.approx([2 / 3, 0.0])


def test_a_more_uncertain_image_scores_higher_under_every_measure():
    dcg = [[0.98, 0.01, 0.01], [0.5, 0.45, 0.05]]
    data = outputs([[[1.0, 0.0, 0.0], [0.95, 0.05, 0.0], [1.05, -0.05, 0.0], [0.98, 0.02, 0.0]], SPLIT], dcg)
    for name in MEASURES:
        values = uncertainty(name, data)
        assert values[1] > values[0], name


def test_chain_measures_need_several_chains():
    single = outputs([[[1.0, 0.0]]])
    assert available_measures(single) == ["entropy", "dcg_entropy", "dcg_max_prob"]
    with pytest.raises(ValueError, match="several chains"):
        uncertainty("t_test", single)
    with pytest.raises(ValueError, match="unknown uncertainty measure 'psychic'"):
        uncertainty("psychic", single)
