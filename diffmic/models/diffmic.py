"""DiffMIC: the guidance model and the denoiser in one module, so that one engine can wrap it.

`forward(batch)` returns the training losses (so DDP and DeepSpeed see a normal forward), and
`predict(images, ...)` runs the guidance model and the image encoder once per image, then only the
denoiser's MLP at each reverse step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import hardware
from ..config import Config, EvalConfig
from ..diffusion import NoiseSchedule, antithetic_timesteps, mmd, sample
from ..diffusion.probability import chain_probabilities
from ..diffusion.sampler import reverse_step
from ..errors import EvalSettingsError
from .backbones import PlainClassifier
from .dcg import DCG, GuidanceLogits
from .denoiser import Denoiser


@dataclass
class Prediction:
    probs: torch.Tensor  # (B, C) class probabilities of the diffusion (or of the classifier for `basic`)
    label: torch.Tensor  # (B,) argmax of probs
    dcg_probs: torch.Tensor  # (B, C) the guidance model's own softmax
    dcg_label: torch.Tensor  # (B,)
    y0: torch.Tensor | None = None  # (B, n_samples, C) final state of every chain
    spread: torch.Tensor | None = None  # (B, C) standard deviation of y0 across chains (n_samples > 1)
    trajectory: list | None = None  # [(timestep, (B, n_samples, C))], y_T first


def check_batch(images: torch.Tensor, labels: torch.Tensor | None, num_classes: int, image_size: int,
                values: bool = True) -> None:
    """Raises ValueError naming what was expected; never lets a wrong shape broadcast silently."""
    expected = f"(B, 3, {image_size}, {image_size})"
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, image_size, image_size):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor of shape {expected}, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor of shape {expected}, got dtype {images.dtype}")
    if labels is not None:
        if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({images.shape[0]},) matching the "
                             f"images, got {labels.dtype} {tuple(labels.shape)}")
        if values and labels.numel() and not bool(((labels >= 0) & (labels < num_classes)).all()):
            raise ValueError(f"labels must lie in 0..{num_classes - 1} (the config's data.num_classes = "
                             f"{num_classes}), got values {sorted(set(labels.tolist()))}")
    if values and not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or infinite values")


# Checkpoints written before the guidance network was named `dcg` in code (as in the config and the outputs)
# hold its weights under `guide.`; they load unchanged.
OLD_PREFIXES = {"guide.": "dcg."}


def _rename_old_keys(state_dict: dict, prefix: str, *_) -> None:
    for name in [name for name in state_dict if name.startswith(prefix)]:
        for old, new in OLD_PREFIXES.items():
            if name.startswith(prefix + old):
                state_dict[prefix + new + name[len(prefix + old):]] = state_dict.pop(name)


class DiffMIC(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        model, diffusion = config.model, config.diffusion
        self.variant = model.variant
        self.num_classes = config.data.num_classes
        self.image_size = config.data.image_size
        self.mmd_weight = diffusion.mmd_weight
        self.fused_prior = diffusion.fused_prior
        self.timesteps = diffusion.timesteps
        self.noise_draws = diffusion.noise_draws
        # Value checks (label range, finiteness) read tensors back to the host; the engine may turn
        # them off on accelerators and check the batch in the data pipeline instead.
        self.check_values = True
        if config.uses_dcg:
            dcg = model.dcg
            self.dcg = DCG(self.num_classes, dcg.backbone, dcg.local_backbone, dcg.k, dcg.top_t,
                           dcg.crop_channels, dcg.attention_dim, dcg.pretrained)
        else:
            self.dcg = PlainClassifier(self.num_classes, model.classifier.backbone, model.classifier.pretrained)
        self.denoiser = None
        if config.uses_diffusion:
            self.denoiser = Denoiser(self.num_classes, model.denoiser.feature_dim, diffusion.timesteps,
                                     model.denoiser.encoder, model.denoiser.pretrained)
        # A plain attribute, not buffers: mixed-precision engines cast buffers, and the schedule's
        # float64 closed forms must stay exact.
        self.schedule = NoiseSchedule.linear(diffusion.timesteps, diffusion.beta_start, diffusion.beta_end)
        self.compiled_step = None  # set by compile_sampling
        self._register_load_state_dict_pre_hook(_rename_old_keys)

    # --- guidance ---------------------------------------------------------------------------------
    def guidance(self, images: torch.Tensor) -> GuidanceLogits:
        out = self.dcg(images)
        return out if isinstance(out, GuidanceLogits) else GuidanceLogits(out)

    def priors(self, logits: GuidanceLogits) -> dict[str, torch.Tensor]:
        """Class probabilities fed to the diffusion: the fused prior and, for the DCG, each stream's."""
        priors = {}
        if logits.global_ is not None:
            priors["global"] = logits.global_.float().softmax(dim=-1)
            priors["local"] = logits.local.float().softmax(dim=-1)
        if self.fused_prior == "mean_softmax" and logits.global_ is not None:
            priors["fused"] = (priors["global"] + priors["local"]) / 2
        else:
            priors["fused"] = logits.fused.float().softmax(dim=-1)
        return priors

    @torch.no_grad()
    def frozen_priors(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Priors from the guidance model in eval mode, without gradients (its mode is restored)."""
        was_training = self.dcg.training
        self.dcg.eval()
        try:
            return self.priors(self.guidance(images))
        finally:
            self.dcg.train(was_training)

    # --- training ---------------------------------------------------------------------------------
    def forward(self, batch: dict, train_denoiser: bool = True, train_dcg: bool = True) -> dict[str, torch.Tensor]:
        """Training losses for one batch: `loss` is their sum. The denoiser loss does not reach the
        guidance model (its priors are computed without gradients) and the cross-entropy does not
        reach the denoiser, so one backward gives each network its own gradient."""
        images, labels = batch["image"], batch["label"]
        check_batch(images, labels, self.num_classes, self.image_size, self.check_values)
        losses: dict[str, torch.Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)
        if train_denoiser and self.denoiser is not None:
            losses.update(self.denoiser_losses(images, labels))
            total = total + losses["denoiser_loss"]
        if train_dcg:
            losses["dcg_loss"] = F.cross_entropy(self.guidance(images).fused.float(), labels)
            total = total + losses["dcg_loss"]
        losses["loss"] = total
        return losses

    def denoiser_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """L_diff = MSE(eps, eps_hat_fused) + lambda (MMD(eps, eps_hat_g) + MMD(eps, eps_hat_l)) for
        `full`; the MSE alone for `c1` and `c2`. One t per sample (antithetic), one eps for all branches."""
        priors = self.frozen_priors(images)
        features = self.denoiser.encode(images)  # once for all branches
        if self.noise_draws > 1:
            # Several (t, eps) per image reuse its features and priors: more denoiser signal per encoder pass.
            features = features.repeat(self.noise_draws, 1)
            priors = {name: prior.repeat(self.noise_draws, 1) for name, prior in priors.items()}
            labels = labels.repeat(self.noise_draws)
        y0 = F.one_hot(labels, self.num_classes).float()
        t = antithetic_timesteps(y0.shape[0], len(self.schedule), device=y0.device)
        eps = torch.randn_like(y0)

        def eps_hat(prior: torch.Tensor) -> torch.Tensor:
            y_t = self.schedule.q_sample(y0, prior, t, eps)
            return self.denoiser(features, y_t, prior, t).float()

        losses = {"mse": F.mse_loss(eps_hat(priors["fused"]), eps)}
        losses["denoiser_loss"] = losses["mse"]
        if self.variant == "full":
            # One MMD per noise draw (rows are draw-major): each compares a batch as the authors' loss does.
            groups = (self.noise_draws, -1, self.num_classes)
            losses["mmd"] = sum(mmd(eps.view(groups), eps_hat(priors[branch]).view(groups))
                                for branch in ("global", "local"))
            losses["denoiser_loss"] = losses["mse"] + self.mmd_weight * losses["mmd"]
        return losses

    def dcg_parameters(self) -> list[nn.Parameter]:
        return list(self.dcg.parameters())

    def denoiser_parameters(self) -> list[nn.Parameter]:
        return list(self.denoiser.parameters()) if self.denoiser is not None else []

    # --- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor, sampling: EvalConfig, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None, record_every: int = 0) -> Prediction:
        """Class probabilities for a batch of images (in eval mode; the previous mode is restored).

        `noise` (S + 1, B * n_samples, C), rows ordered image-major, fixes every chain's noise; else
        `generator` (or the global RNG) draws it. `sampling`: the evaluation settings (sampler, steps, chains, rule),
        resolved by the caller (diffmic.evaluation.settings).
        """
        check_batch(images, None, self.num_classes, self.image_size, self.check_values)
        was_training = self.training
        self.eval()
        try:
            logits = self.guidance(images)
            priors = self.priors(logits)
            dcg_probs = logits.fused.float().softmax(dim=-1)
            if self.denoiser is None:
                label = dcg_probs.argmax(dim=-1)
                return Prediction(dcg_probs, label, dcg_probs, label)
            return self._diffuse(images, priors["fused"], dcg_probs, sampling, generator, noise, record_every)
        finally:
            self.train(was_training)

    def _diffuse(self, images, prior, dcg_probs, sampling: EvalConfig, generator, noise,
                 record_every) -> Prediction:
        batch, n_samples = images.shape[0], sampling.n_samples
        features = self.denoiser.encode(images).repeat_interleave(n_samples, dim=0)
        prior_rows = prior.repeat_interleave(n_samples, dim=0)

        if self.compiled_step is None:
            denoise = lambda y_t, t: self.denoiser(features, y_t, prior_rows, t).float()  # noqa: E731
            y0, trajectory = sample(denoise, prior_rows, self.schedule, sampling.sampler, sampling.steps, noise,
                                    generator, record_every)
        else:
            y0, trajectory = self._sample_compiled(features, prior_rows, sampling, noise, generator, record_every)
        y0 = y0.view(batch, n_samples, self.num_classes)
        probs = chain_probabilities(y0, sampling.rule, sampling.temperature)
        label = probs.argmax(dim=-1)
        prediction = Prediction(probs, label, dcg_probs, dcg_probs.argmax(dim=-1), y0)
        if n_samples > 1:
            prediction.spread = y0.std(dim=1)
        if record_every:
            prediction.trajectory = [(t, y.view(batch, n_samples, -1)) for t, y in trajectory]
        return prediction


    # --- compiled sampling ------------------------------------------------------------------------
    def _sampling_step(self, features: torch.Tensor, prior: torch.Tensor, y_t: torch.Tensor, t: torch.Tensor,
                       row: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return reverse_step(y_t, prior, self.denoiser(features, y_t, prior, t).float(), row, z)

    def _sample_compiled(self, features, prior_rows, sampling: EvalConfig, noise, generator, record_every):
        import torch._inductor.config as inductor

        def step(y_t: torch.Tensor, t: torch.Tensor, row: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            # A CUDA graph's output lives in a buffer its next replay overwrites: a new step begins, and
            # the state is copied out (the trajectory keeps some states). Both are free on a CPU.
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled_step(features, prior_rows, y_t, t, row, z).clone()

        # Read when a graph is compiled (the first call of each batch shape), so set around the whole chain;
        # torch.compile's `options` does not reach it.
        with inductor.patch(freezing=True):
            return sample(None, prior_rows, self.schedule, sampling.sampler, sampling.steps, noise, generator,
                          record_every, step)

    def compile_sampling(self, device: torch.device) -> None:
        """Compiles one reverse step (the denoiser's MLP and the update) into one graph for `predict`.

        For inference only: the weights are frozen into the graph as constants (inductor's `freezing`), so
        autocast's casts of them are done once at compile time instead of at every step, and later changes
        to the weights are not seen. On a GPU the graph is also captured as a CUDA graph (what
        mode="reduce-overhead" does): a step is then one launch instead of a dozen small ones. One compile per
        batch shape and precision; the first call pays it.
        """
        if self.denoiser is None:
            return
        if device.type == "cpu" and hardware.cpp_compiler() is None:  # found now, not at the first batch
            raise EvalSettingsError("--compile (eval.compile) on a CPU needs a C++ compiler and none was found "
                                    "(g++, or the one $CXX names): install one (e.g. apt install g++) or "
                                    "evaluate without --compile")
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.compiled_step = torch.compile(self._sampling_step, dynamic=False, mode=mode)


def build_model(config: Config) -> DiffMIC:
    return DiffMIC(config)
