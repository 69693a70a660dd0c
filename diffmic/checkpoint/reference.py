"""The authors' checkpoints (github.com/scott-yjyang/DiffMIC) as diffmic weights: a mapping by name.

Their training script saves two lists with `torch.save`:
    ckpt*.pth      [denoiser state_dict, optimizer, epoch, step, (EMA shadow when model.ema)]
    aux_ckpt*.pth  [DCG state_dict, optimizer]
Their denoiser is `ConditionalModel` (encoder_x.f = a torchvision ResNet's children but fc, encoder_x.g,
norm, lin1..lin3 = ConditionalLinear(lin, embed), unetnorm1..3, lin4); their DCG holds ds_net.f and
dn_resnet.f (a ResNet-50's children but fc and avgpool), left_postprocess_net.gn_conv_last, mil_attn_U/V/w
and classifier_linear. Every diffmic weight must come from exactly one of theirs with the same shape:
anything missing, left over or of another shape is refused, naming the keys.

One weight is not a plain copy: their ConditionalLinear embeds the position 0..T-1 of the step in the
1000-step arrays, diffmic's the diffusion time 1..T (schedule.py). Both tables have T + 1 rows, so the
rows move down by one: diffmic's row t holds their row t - 1, and their never-used row T becomes
diffmic's never-used row 0 (a bijection: nothing is lost).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

# A torchvision ResNet's children are conv1, bn1, relu, maxpool, layer1..layer4 (avgpool, fc): the authors
# index them in an nn.Sequential; diffmic's ResNetTrunk names them stem.0..3 and layers.0..3.
TRUNK_CHILDREN = {0: "stem.0", 1: "stem.1", 4: "layers.0", 5: "layers.1", 6: "layers.2", 7: "layers.3"}
DENOISER_PREFIXES = {
    "encoder_x.g.": "encoder.project.", "norm.": "encoder.norm.", "lin4.": "output.",
    **{f"lin{i}.lin.": f"layer{i}.linear." for i in (1, 2, 3)},
    **{f"lin{i}.embed.": f"layer{i}.gain." for i in (1, 2, 3)},
    **{f"unetnorm{i}.": f"norm{i}." for i in (1, 2, 3)},
    **{f"encoder_x.f.{index}.": f"encoder.trunk.{child}." for index, child in TRUNK_CHILDREN.items()},
}
DCG_PREFIXES = {
    "left_postprocess_net.gn_conv_last.": "saliency_head.", "mil_attn_U.": "mil.gate.",
    "mil_attn_V.": "mil.value.", "mil_attn_w.": "mil.score.", "classifier_linear.": "mil.classifier.",
    **{f"ds_net.f.{index}.": f"global_trunk.{child}." for index, child in TRUNK_CHILDREN.items()},
    **{f"dn_resnet.f.{index}.": f"local_trunk.{child}." for index, child in TRUNK_CHILDREN.items()},
}
SHOWN = 4  # keys named per kind of problem in a refusal
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm's buffers


@dataclass
class ReferenceFiles:
    """What the two files hold, as plain values."""

    denoiser: dict[str, torch.Tensor]
    dcg: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None  # the denoiser's EMA shadow (parameters only), when saved
    epoch: int
    step: int


@dataclass
class ImportedWeights:
    """A DiffMIC state dict and, when the authors saved one, the denoiser's EMA in diffmic's form."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None


# --- reading the files ----------------------------------------------------------------------------------
def load_reference_files(ckpt: str | Path, aux_ckpt: str | Path) -> ReferenceFiles:
    """Both lists, read with `weights_only=True`: a pickle that would build any other object is refused."""
    denoiser_list = _load_list(Path(ckpt), "--ckpt", "[denoiser state_dict, optimizer, epoch, step, (EMA)]")
    dcg_list = _load_list(Path(aux_ckpt), "--aux-ckpt", "[DCG state_dict, optimizer]")
    denoiser = _state_dict(denoiser_list[0], ckpt, "item 0 (the denoiser's state_dict)")
    dcg = _state_dict(dcg_list[0], aux_ckpt, "item 0 (the DCG's state_dict)")
    ema = _state_dict(denoiser_list[4], ckpt, "item 4 (the EMA shadow)") if len(denoiser_list) > 4 else None
    epoch, step = (_integer(denoiser_list, index, ckpt) for index in (2, 3))
    return ReferenceFiles(denoiser, dcg, ema, epoch, step)


def _load_list(path: Path, option: str, layout: str) -> list:
    if not path.is_file():
        raise CheckpointError(f"{option} {path} does not exist")
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a file that is no torch file makes torch raise anything (KeyError, ...)
        raise CheckpointError(f"refusing {option} {path}: {why_not_weights(error)}; it is read with "
                              f"torch.load(weights_only=True), which builds tensors and plain containers only "
                              f"(loading other pickled objects can run code)") from None
    if not isinstance(values, (list, tuple)) or not values:
        raise CheckpointError(f"refusing {option} {path}: it holds a {type(values).__name__}, not the list "
                              f"{layout} that the authors' training script saves")
    return list(values)


def why_not_weights(error: BaseException) -> str:
    """One phrase from torch's many-line refusal: the object the pickle asked for, else its first line."""
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    if named:
        return f"it is a pickle that builds {named.group(1)}, which no checkpoint of weights needs"
    lines = str(error).strip().splitlines()
    return f"it is not a readable torch file ({lines[0] if lines else type(error).__name__})"


def _state_dict(value, path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in value.items()):
        raise CheckpointError(f"refusing {path}: its {what} is not a dict of named tensors")
    return dict(value)


def _integer(values: list, index: int, path) -> int:
    """Their epoch and step (0 when the list is shorter): the imported checkpoint is numbered by the step."""
    if len(values) <= index:
        return 0
    value = values[index]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"refusing {path}: item {index} should be a non-negative integer "
                              f"(epoch, step), got {value!r}")
    return value


# --- mapping ---------------------------------------------------------------------------------------------
def diffmic_name(authors_name: str, prefixes: dict[str, str]) -> str | None:
    """The diffmic name of one of their keys, None when no rule knows it. Prefixes never overlap
    (`norm.` is not a prefix of `unetnorm1.`), so at most one rule applies."""
    for theirs, ours in prefixes.items():
        if authors_name.startswith(theirs):
            return ours + authors_name[len(theirs):]
    return None


@dataclass
class Mismatch:
    """Keys of one network that do not map: theirs left over, ours without a source, shapes that differ."""

    where: str
    missing: list[str]
    extra: list[str]
    wrong_shape: list[str]

    def describe(self) -> list[str]:
        kinds = (("missing (no weight of theirs maps to)", self.missing), ("unexpected", self.extra),
                 ("of the wrong shape", self.wrong_shape))
        return [f"{self.where}: {len(names)} {kind} {', '.join(sorted(names)[:SHOWN])}"
                f"{', ...' if len(names) > SHOWN else ''}" for kind, names in kinds if names]


def convert_part(state: dict[str, torch.Tensor], prefixes: dict[str, str], expected: dict[str, torch.Size],
                 where: str) -> tuple[dict[str, torch.Tensor], Mismatch]:
    """Their state dict of one network -> (the weights under diffmic's names, what did not fit). `expected`
    maps each diffmic name of that network to its shape."""
    converted, extra, wrong = {}, [], []
    for name, value in state.items():
        ours = diffmic_name(name, prefixes)
        if ours is None or ours not in expected:
            extra.append(name)
        elif tuple(value.shape) != tuple(expected[ours]):
            wrong.append(f"{name} {tuple(value.shape)} -> {ours} {tuple(expected[ours])}")
        else:
            converted[ours] = shift_timestep_rows(value) if ours.endswith(".gain.weight") else value
    sources = {diffmic_name(name, prefixes) for name in state}
    missing = sorted(name for name in expected if name not in converted and name not in sources)
    return converted, Mismatch(where, missing, extra, wrong)


def shift_timestep_rows(embedding: torch.Tensor) -> torch.Tensor:
    """Their row i (step position i) becomes diffmic's row i + 1 (diffusion time i + 1); see the module doc."""
    return torch.roll(embedding, shifts=1, dims=0)


def convert_reference(files: ReferenceFiles, expected: dict[str, torch.Size], ckpt_name: str = "--ckpt",
                      aux_name: str = "--aux-ckpt") -> ImportedWeights:
    """Their denoiser, DCG and EMA -> a complete DiffMIC state dict (names `denoiser.*`, `dcg.*`) and the
    denoiser's EMA. `expected` is the DiffMIC model's {name: shape}; CheckpointError names every mismatch."""
    parts = {part: {name[len(part) + 1:]: shape for name, shape in expected.items() if name.startswith(part + ".")}
             for part in ("denoiser", "dcg")}
    others = sorted(name for name in expected if not name.startswith(("denoiser.", "dcg.")))
    denoiser, denoiser_mismatch = convert_part(files.denoiser, DENOISER_PREFIXES, parts["denoiser"],
                                               f"{ckpt_name} (denoiser)")
    dcg, dcg_mismatch = convert_part(files.dcg, DCG_PREFIXES, parts["dcg"], f"{aux_name} (DCG)")
    problems = denoiser_mismatch.describe() + dcg_mismatch.describe()
    if others:
        problems.append(f"the diffmic model also has {', '.join(others[:SHOWN])}, which the authors' files lack")
    ema, ema_problems = convert_ema(files.ema, denoiser, parts["denoiser"], ckpt_name)
    problems += ema_problems
    if problems:
        raise CheckpointError("the authors' checkpoints do not fit this config's model: " + "; ".join(problems)
                              + ". Check model.dcg.backbone (resnet50), model.denoiser.encoder and feature_dim, "
                                "data.num_classes and diffusion.timesteps against the authors' config")
    model = {f"denoiser.{name}": value for name, value in denoiser.items()}
    model.update({f"dcg.{name}": value for name, value in dcg.items()})
    return ImportedWeights(model, ema)


def convert_ema(shadow: dict[str, torch.Tensor] | None, denoiser: dict[str, torch.Tensor],
                expected: dict[str, torch.Size], ckpt_name: str) -> tuple[dict | None, list[str]]:
    """Their EMA shadow holds the denoiser's parameters only; diffmic's also holds its floating-point
    buffers (BatchNorm running statistics). Their evaluation copy takes the buffers from the raw model
    (`EMA.ema_copy`), so the raw buffers complete the shadow. Returns (diffmic's shadow, problems)."""
    if shadow is None:
        return None, []
    parameters, mismatch = convert_part(shadow, DENOISER_PREFIXES, expected, f"{ckpt_name} (EMA)")
    buffers = {name for name in expected if name.rsplit(".", 1)[-1] in BUFFER_NAMES}
    mismatch.missing = [name for name in mismatch.missing if name not in buffers]  # never in their shadow
    completed = {name: value for name, value in denoiser.items() if name in buffers and value.is_floating_point()}
    return {**completed, **parameters}, mismatch.describe()


def read_reference_weights(config, ckpt: str | Path, aux_ckpt: str | Path) -> tuple[ReferenceFiles, ImportedWeights]:
    """(what the two files hold, the diffmic weights): both read weights-only and mapped onto the model `config`
    builds (names and shapes from the model itself)."""
    from ..models import build_model
    from .record import skipped_initialisation, without_pretrained

    files = load_reference_files(ckpt, aux_ckpt)
    with skipped_initialisation():  # only the names and shapes are needed
        model = build_model(without_pretrained(config))
    expected = {name: value.shape for name, value in model.state_dict().items()}
    del model
    return files, convert_reference(files, expected)
