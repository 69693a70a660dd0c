"""How the final states y_0 of an image's chains become its class probabilities: the one
place that names the rules (the config's `eval.aggregate` and `eval.probability` choices follow) and applies
them (DiffMIC.predict).

torch is imported on first use: the config reads the names without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# How an image's chains combine: the mean of their final states, or a majority vote of their labels.
AGGREGATES = ("mean", "vote")
# How the (mean) final state becomes probabilities: the normalised positive part, the softmax (the authors'
# code), or the share of chains voting each class.
PROBABILITY_RULES = ("positive_part", "softmax", "vote")


def rule_in_force(aggregate: str, probability: str) -> str:
    """The rule that maps the chains to probabilities: a majority vote makes them the vote shares."""
    return "vote" if aggregate == "vote" else probability


def conflict(aggregate: str, probability: str) -> str | None:
    """Why `aggregate` and `probability` cannot go together, or None: a vote with a softmax on top would
    silently ignore the softmax."""
    if aggregate == "mean" or probability in ("positive_part", "vote"):
        return None
    return (f"got {probability!r} with aggregate: vote, which makes the probabilities the chains' vote shares; "
            "use aggregate: mean or probability: vote")


def chain_probabilities(y0: torch.Tensor, rule: str = "positive_part", temperature: float = 1.0) -> torch.Tensor:
    """Maps the final states of an image's chains (B, n_samples, C) to probabilities (B, C), by `rule`:

    - positive_part: y0 lives on the scale of one-hot labels, so the positive part of the chains' mean state is
      normalised; a mean state with no positive entry falls back to its softmax;
    - softmax: the softmax of the chains' mean state (the authors' code) over `temperature` (eval.temperature;
      1 is the authors' softmax; any temperature keeps the argmax);
    - vote: the share of the chains whose state's argmax is each class (one-hot for a single chain).
    """
    import torch
    import torch.nn.functional as F

    if rule == "vote":
        return F.one_hot(y0.argmax(dim=-1), y0.shape[-1]).to(y0.dtype).mean(dim=1)
    state = y0.mean(dim=1)
    if rule == "softmax":
        return (state / temperature).softmax(dim=-1)
    if rule != "positive_part":
        raise ValueError(f"unknown probability rule {rule!r}; expected one of {', '.join(PROBABILITY_RULES)}")
    positive = state.clamp_min(0)
    total = positive.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, positive / total.clamp_min(1e-12), state.softmax(dim=-1))
