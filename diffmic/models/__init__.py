"""Networks: the DCG guidance model, the denoiser, and the DiffMIC module that holds both."""

from .backbones import PlainClassifier, ResNetTrunk
from .dcg import DCG, GuidanceLogits, crop_tiles, select_roi_cells, top_t_pool
from .denoiser import ConditionalLinear, Denoiser
from .diffmic import DiffMIC, Prediction, build_model, check_batch

__all__ = ["ConditionalLinear", "DCG", "Denoiser", "DiffMIC", "GuidanceLogits", "PlainClassifier", "Prediction",
           "ResNetTrunk", "build_model", "check_batch", "crop_tiles", "select_roi_cells", "top_t_pool"]
