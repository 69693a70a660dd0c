"""Where a trunk's starting weights come from: a config's `pretrained` key says `imagenet`, a file, or ''.

`imagenet` is torchvision's IMAGENET1K_V1 weights of the trunk's architecture (the file the authors'
`resnet50(pretrained=True)` loads). They come through torchvision's weights API into the torch hub cache
($TORCH_HOME/hub/checkpoints), downloaded once with its hash check; a cached file is never fetched again.
Compute nodes are often offline: `diffmic weights fetch` fills the cache on a login node, and with
DIFFMIC_OFFLINE=1 nothing is ever downloaded (a missing file is then an error that says where to put it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import PretrainedWeightsError

IMAGENET = "imagenet"
OFFLINE_VARIABLE = "DIFFMIC_OFFLINE"


@dataclass(frozen=True)
class WeightsRequest:
    """One trunk's starting weights as the config asks for them."""

    key: str  # the config key that asks, e.g. model.dcg.pretrained
    trunk: str  # what starts from them, e.g. "DCG global trunk"
    arch: str  # resnet18 / resnet34 / resnet50
    source: str  # "imagenet" or a path

    @property
    def is_imagenet(self) -> bool:
        return self.source == IMAGENET

    @property
    def path(self) -> Path:
        """The file that is read: the torch hub cache entry for `imagenet`, else the configured path."""
        return imagenet_file(self.arch) if self.is_imagenet else Path(self.source)

    @property
    def url(self) -> str:
        return imagenet_weights(self.arch).url if self.is_imagenet else ""

    def describe(self) -> str:
        what = f"ImageNet weights ({self.arch} {imagenet_weights(self.arch)})" if self.is_imagenet else "weights"
        return f"{self.trunk} starts from {what} in {self.path}"


def imagenet_weights(arch: str):
    """torchvision's IMAGENET1K_V1 entry of `arch` (a WeightsEnum member: url, hash, transforms)."""
    from torchvision.models import get_model_weights

    return get_model_weights(arch).IMAGENET1K_V1


def imagenet_file(arch: str) -> Path:
    """Where torchvision's weights API keeps (and first looks for) the ImageNet file of `arch`."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(imagenet_weights(arch).url).path).name


def requested_weights(config) -> list[WeightsRequest]:
    """Every trunk of the model `config` builds that starts from a file, in model order."""
    model = config.model
    asked: list[tuple[str, str, str, str]] = []
    if config.uses_dcg:
        asked += [("model.dcg.pretrained", "DCG global trunk", model.dcg.backbone, model.dcg.pretrained),
                  ("model.dcg.pretrained", "DCG local trunk", model.dcg.local_backbone, model.dcg.pretrained)]
    else:
        asked.append(("model.classifier.pretrained", "classifier trunk", model.classifier.backbone,
                      model.classifier.pretrained))
    if config.uses_diffusion:
        asked.append(("model.denoiser.pretrained", "denoiser image encoder", model.denoiser.encoder,
                      model.denoiser.pretrained))
    return [WeightsRequest(*entry) for entry in asked if entry[3]]


def offline() -> bool:
    return os.environ.get(OFFLINE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def fetch(request: WeightsRequest) -> Path:
    """The request's file, downloaded first through torchvision's weights API if it is ImageNet's and not
    cached (unless offline). A missing file is a PretrainedWeightsError that says how to get it."""
    if request.path.is_file():
        return request.path
    if not request.is_imagenet:
        raise PretrainedWeightsError(
            f"pretrained weights {request.path} ({request.key}) do not exist; point {request.key} at a "
            f"torchvision {request.arch} state dict, use '{IMAGENET}' for torchvision's ImageNet weights, "
            f"or '' to train from scratch")
    if offline():
        _missing(request, f"{OFFLINE_VARIABLE} is set")
    try:
        imagenet_weights(request.arch).get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash is a RuntimeError
        _missing(request, f"the download failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    return request.path


def _missing(request: WeightsRequest, why: str):
    raise PretrainedWeightsError(
        f"{request.key}='{IMAGENET}' needs {request.path.name} (torchvision {imagenet_weights(request.arch)}), "
        f"which is not in the torch hub cache and cannot be downloaded here ({why}). Put the file at "
        f"{request.path} (fetch it on a machine with internet from {request.url}, or run `diffmic weights fetch "
        f"--config FILE` there and copy $TORCH_HOME), or set {request.key}='' to train from scratch")


def fetch_all(config) -> list[WeightsRequest]:
    """Makes sure every file `config` starts from is on this machine; returns the requests."""
    requests = requested_weights(config)
    for request in requests:
        fetch(request)
    return requests


def load_pretrained(module, source: str, arch: str) -> None:
    """Loads the starting weights `source` (see the module docstring) into a torchvision ResNet `module`;
    the classifier head is ignored."""
    import torch

    path = fetch(WeightsRequest(key="pretrained", trunk=f"a {arch} trunk", arch=arch, source=source))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle that needs code, a truncated file, not a torch file at all
        raise PretrainedWeightsError(f"{path} is not a readable state dict of {arch} weights "
                                     f"({str(error).splitlines()[0][:160]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path} does not hold {arch} weights: expected a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ: weights of another architecture
        raise PretrainedWeightsError(f"{path} does not hold {arch} weights: {str(error).splitlines()[1:2]}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{path} does not hold {arch} weights: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
