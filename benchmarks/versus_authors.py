"""diffmic against the authors' code (github.com/scott-yjyang/DiffMIC), side by side in one process, on one
device, with the same threads: images/s of a training step and seconds per image of sampling at the paper
config (HAM10000: 224 px, C = 7, T = 1000 for training, 250 reverse steps for sampling).

    git clone https://github.com/scott-yjyang/DiffMIC /tmp/authors-diffmic      (anywhere outside this repository)
    python benchmarks/versus_authors.py --authors /tmp/authors-diffmic [--train-batch 32,8] [--sample-batch 8] [--compile]

Their modules are imported from that checkout, nothing of theirs is copied here. Their training step is the
body of their training loop (`Diffusion.train`): the DCG's priors with autograd on, three denoiser passes (one
per prior, each encoding the image again), MSE + MMD, clipping, Adam, their EMA, then the DCG's own
cross-entropy step. Their sampling is the body of `Diffusion.test`: the DCG twice, then `p_sample_loop`, whose
every reverse step runs the denoiser's image encoder. Their weights stay random (timing does not depend on
them), so nothing is downloaded; their code has no mixed precision, so they always run fp32.
"""

from __future__ import annotations

import argparse
import sys
import types
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from diffmic.engine.optim import ExponentialMovingAverage, build_optimizer

from sampling import measure
from timing import REPO_CONFIGS, device_and_threads, model_for
from train_step import one_step, seconds

PAPER = REPO_CONFIGS["paper (HAM10000, 224 px, C=7)"]


def authors_config() -> types.SimpleNamespace:
    """Their configs/isic.yml, the keys their model, DCG, schedule and optimisers read."""
    ns = types.SimpleNamespace
    return ns(data=ns(num_classes=7),
              model=ns(data_dim=3 * 224 * 224, arch="resnet18", feature_dim=6144, hidden_dim=6144, ema_rate=0.9999),
              diffusion=ns(timesteps=1000, test_timesteps=250, beta_start=0.0001, beta_end=0.02),
              optim=ns(lr=0.001, grad_clip=1.0), aux_optim=ns(lr=0.0002))


def import_authors(checkout: Path) -> dict:
    """Their modules, importable without the packages only their data loading and plots need (timm is
    imported at the top of model.py for a ViT option the paper config does not use)."""
    if not (checkout / "diffusion_utils.py").is_file():
        raise SystemExit(f"{checkout} is not a checkout of scott-yjyang/DiffMIC (no diffusion_utils.py)")
    if "timm" not in sys.modules:
        timm = types.ModuleType("timm")
        timm.models = types.ModuleType("timm.models")
        timm.models.create_model = None
        sys.modules.update({"timm": timm, "timm.models": timm.models})
    sys.path.insert(0, str(checkout))
    import diffusion_utils
    import ema
    import model
    import pretraining.dcg
    import pretraining.modules
    # Their DCG trunk calls resnet50(pretrained=True): random weights instead, so nothing is downloaded.
    pretraining.modules.resnet50 = lambda pretrained=False, **kwargs: torchvision.models.resnet50()
    return {"utils": diffusion_utils, "EMA": ema.EMA, "ConditionalModel": model.ConditionalModel,
            "DCG": pretraining.dcg.DCG}


class Authors:
    """Their denoiser, DCG, schedule, optimisers and EMA as their `Diffusion` object sets them up."""

    def __init__(self, code: dict, device: torch.device):
        config = self.config = authors_config()
        self.utils, self.device = code["utils"], device
        torch.manual_seed(0)
        self.model = code["ConditionalModel"](config, guidance=True).to(device)
        self.dcg = code["DCG"](config).to(device)
        if device.type != "cuda":  # their DCG hard-codes cuda:0 for its crop masks
            self.dcg.experiment_parameters["device_type"] = "cpu"
            self.dcg.retrieve_roi_crops.gpu_number = None
        betas = self.utils.make_beta_schedule("linear", config.diffusion.timesteps, config.diffusion.beta_start,
                                              config.diffusion.beta_end).float().to(device)
        self.alphas = 1.0 - betas
        alphas_cumprod = self.alphas.cumprod(dim=0)
        self.alphas_bar_sqrt, self.one_minus_alphas_bar_sqrt = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr, betas=(0.9, 0.999), eps=1e-8)
        self.aux_optimizer = torch.optim.Adam(self.dcg.parameters(), lr=config.aux_optim.lr, betas=(0.9, 0.999),
                                              eps=1e-8, amsgrad=True)
        self.ema = code["EMA"](mu=config.model.ema_rate)
        self.ema.register(self.model)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        u, n, T = self.utils, images.shape[0], self.config.diffusion.timesteps
        self.model.train()
        self.dcg.eval()
        t = torch.randint(0, T, (n // 2 + 1,), device=self.device)
        t = torch.cat([t, T - 1 - t], dim=0)[:n]
        fused, global_, local = (p.softmax(dim=1) for p in self.dcg(images))  # autograd on, as theirs
        y_0 = F.one_hot(labels, self.config.data.num_classes).float()
        e = torch.randn_like(y_0)
        outputs = [self.model(images, u.q_sample(y_0, prior, self.alphas_bar_sqrt, self.one_minus_alphas_bar_sqrt,
                                                 t, noise=e), t, prior) for prior in (fused, global_, local)]
        loss = (e - outputs[0]).square().mean() + 0.5 * (u.compute_mmd(e, outputs[1]) + u.compute_mmd(e, outputs[2]))
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.dcg.train()
        aux_loss = F.cross_entropy(self.dcg(images)[0], y_0)
        self.aux_optimizer.zero_grad()
        aux_loss.backward()
        self.aux_optimizer.step()
        aux_loss.item()

    @torch.no_grad()
    def sample(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        self.dcg.eval()
        prior = self.dcg(images)[0].softmax(dim=1)  # their test loop runs the DCG once for y_T's mean ...
        y_hat = self.dcg(images)[0].softmax(dim=1)  # ... and once more for the denoiser's guidance
        y_0 = self.utils.p_sample_loop(self.model, images, y_hat, prior, self.config.diffusion.test_timesteps,
                                       self.alphas, self.one_minus_alphas_bar_sqrt, only_last_sample=True)
        return y_0.softmax(dim=-1)


def paper_batch(batch: int, device: torch.device) -> dict:
    return {"image": torch.randn(batch, 3, 224, 224, device=device), "label": torch.randint(0, 7, (batch,), device=device),
            "key": [str(i) for i in range(batch)]}


def diffmic_autocast(precision: str, device: torch.device):
    return nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=torch.bfloat16)


def compare_training(authors: Authors, batch_size: int, precisions: list[str], repeats: int, device) -> None:
    batch = paper_batch(batch_size, device)
    theirs = batch_size / seconds(lambda: authors.train_step(batch["image"], batch["label"]), repeats)
    print(f"training step, batch {batch_size:3d}: authors' code fp32 {theirs:6.2f} images/s", flush=True)
    model, config = model_for(PAPER, device)
    model.train()
    optimizer = build_optimizer(model, config.train)
    ema = ExponentialMovingAverage(model.denoiser, config.train.ema_rate)
    for precision in precisions:
        ours = batch_size / seconds(
            lambda: one_step(model, optimizer, ema, batch, diffmic_autocast(precision, device)), repeats)
        print(f"training step, batch {batch_size:3d}: diffmic {precision:4s} {ours:6.2f} images/s = "
              f"{ours / theirs:.1f}x the authors' code", flush=True)


def compare_sampling(authors: Authors, batch_size: int, precisions: list[str], repeats: int, device,
                     compiled: bool) -> None:
    images = paper_batch(batch_size, device)["image"]
    steps = authors.config.diffusion.test_timesteps
    theirs = seconds(lambda: authors.sample(images), repeats) / batch_size
    print(f"sampling {steps} steps, batch {batch_size:3d}: authors' code fp32 {theirs:6.2f} s/image", flush=True)
    model, config = model_for(PAPER, device)
    model.eval()
    for precision, compile_step in [(p, c) for p in precisions for c in (False, True) if c <= compiled]:
        model.compiled_step = None
        if compile_step:  # `--compile`; measure's untimed warm-up call compiles the step
            model.compile_sampling(device)
        # The paper config's evaluation (respaced, one chain per image), as `diffmic eval` runs it.
        rate = measure(model, config, batch_size, steps, repeats, device, diffmic_autocast(precision, device))
        ours = 1 / rate["images_per_s"]
        name = f"{precision} compiled" if compile_step else precision
        print(f"sampling {steps} steps, batch {batch_size:3d}: diffmic {name:13s} {ours:6.2f} s/image = "
              f"{theirs / ours:.1f}x the authors' code", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--authors", type=Path, required=True, help="a checkout of scott-yjyang/DiffMIC")
    parser.add_argument("--train-batch", default="32,8", help="training batch sizes, comma-separated ('' skips)")
    parser.add_argument("--sample-batch", default="8", help="sampling batch sizes, comma-separated ('' skips)")
    parser.add_argument("--precision", default="fp32,bf16",
                        help="diffmic's precisions (bf16 = autocast; fast on a CPU only with avx512_bf16 or AMX)")
    parser.add_argument("--steps", type=int, default=250, help="reverse steps of both samplers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time diffmic's sampling with --compile")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {device_and_threads()}; diffmic precisions {args.precision}, authors' code fp32")
    authors = Authors(import_authors(args.authors.resolve()), device)
    authors.config.diffusion.test_timesteps = args.steps
    precisions = args.precision.split(",")
    for batch in filter(None, args.train_batch.split(",")):
        compare_training(authors, int(batch), precisions, args.repeats, device)
    for batch in filter(None, args.sample_batch.split(",")):
        compare_sampling(authors, int(batch), precisions, args.repeats, device, args.compile)


if __name__ == "__main__":
    main()
