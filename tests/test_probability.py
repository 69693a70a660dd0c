"""eval.probability: how the chains' final states y_0 become class probabilities (positive_part, softmax, vote)."""

import pytest
import torch

from diffmic.config import ConfigError, EvalConfig, config_from_dict
from diffmic.diffusion.probability import PROBABILITY_RULES, chain_probabilities
from diffmic.errors import EvalSettingsError
from diffmic.evaluation.settings import resolve_eval_settings
from diffmic.models import DiffMIC

SMALL = {"data": {"num_classes": 3, "image_size": 64},
         "model": {"dcg": {"backbone": "resnet18", "local_backbone": "resnet18", "k": 1},
                   "denoiser": {"feature_dim": 16}},
         "eval": {"steps": 4}}

# Two images, three chains each, three classes.
Y0 = torch.tensor([[[0.6, 0.6, -0.2], [1.2, 0.0, -0.4], [0.0, 0.3, 0.0]],
                   [[-0.5, -0.1, -0.3], [-0.7, -0.2, -0.6], [-0.3, 0.0, -0.3]]])


def small_config(**eval_section):
    return config_from_dict({**SMALL, "eval": {**SMALL["eval"], **eval_section}})


def test_positive_part_normalises_the_positive_part_of_the_chains_mean():
    probs = chain_probabilities(Y0, "positive_part")
    # Image 0: mean state (0.6, 0.3, -0.2) -> positive part (0.6, 0.3, 0) -> (2/3, 1/3, 0).
    torch.testing.assert_close(probs[0], torch.tensor([2 / 3, 1 / 3, 0.0]))
    # Image 1: mean state (-0.5, -0.1, -0.4) has no positive entry: its softmax.
    torch.testing.assert_close(probs[1], torch.tensor([-0.5, -0.1, -0.4]).softmax(dim=0))
    torch.testing.assert_close(chain_probabilities(Y0), probs)  # positive_part is the default rule


def test_softmax_is_the_softmax_of_the_chains_mean():
    probs = chain_probabilities(Y0, "softmax")
    torch.testing.assert_close(probs[0], torch.tensor([0.6, 0.3, -0.2]).softmax(dim=0))
    torch.testing.assert_close(probs[1], torch.tensor([-0.5, -0.1, -0.4]).softmax(dim=0))


def test_vote_is_the_share_of_chains_per_class():
    probs = chain_probabilities(Y0, "vote")
    # Image 0: the chains' argmaxes are 0 (a tie 0.6/0.6 goes to the first), 0 and 1.
    torch.testing.assert_close(probs[0], torch.tensor([2 / 3, 1 / 3, 0.0]))
    # Image 1: 1, 1, 1.
    torch.testing.assert_close(probs[1], torch.tensor([0.0, 1.0, 0.0]))
    # One chain: one-hot.
    torch.testing.assert_close(chain_probabilities(Y0[:, 1:2], "vote"), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))


def test_an_unknown_rule_is_refused_everywhere():
    with pytest.raises(ValueError, match="probability rule"):
        chain_probabilities(Y0, "argmax")
    with pytest.raises(ConfigError, match="probability"):
        EvalConfig(probability="argmax")
    with pytest.raises(ConfigError, match="probability"):
        small_config(probability="argmax")
    # A majority vote makes the probabilities vote shares: a softmax on top would be silently ignored.
    with pytest.raises(ConfigError, match="aggregate: vote"):
        small_config(aggregate="vote", probability="softmax")
    with pytest.raises(EvalSettingsError, match="eval.probability: got 'softmax' with aggregate: vote"):
        resolve_eval_settings(small_config(aggregate="vote"), probability="softmax")


def test_the_config_default_is_todays_rule():
    assert small_config().eval.probability == "positive_part"
    assert resolve_eval_settings(small_config()).rule == "positive_part"
    # The older spelling of the vote rule still works.
    assert resolve_eval_settings(small_config(aggregate="vote", n_samples=3)).rule == "vote"


@pytest.mark.parametrize("rule", PROBABILITY_RULES)
def test_the_resolved_rule_reaches_the_prediction(rule):
    config = small_config(probability=rule, n_samples=3)
    sampling = resolve_eval_settings(config)
    assert sampling.probability == rule and sampling.n_samples == 3
    torch.manual_seed(0)
    model = DiffMIC(config)
    images = torch.randn(2, 3, 64, 64)
    noise = torch.randn(sampling.steps + 1, 2 * 3, 3)
    prediction = model.predict(images, sampling, noise=noise)
    assert prediction.y0.shape == (2, 3, 3)
    torch.testing.assert_close(prediction.probs, chain_probabilities(prediction.y0, rule))
    torch.testing.assert_close(prediction.label, prediction.probs.argmax(dim=1))
    # The same chains under the default rule: only the mapping from y_0 changed.
    default = model.predict(images, EvalConfig(sampler=sampling.sampler, steps=sampling.steps, n_samples=3),
                            noise=noise)
    torch.testing.assert_close(default.y0, prediction.y0)
    torch.testing.assert_close(default.probs, chain_probabilities(prediction.y0, "positive_part"))
