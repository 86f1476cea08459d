"""The paper's experiments, one module each, all run by `narrowgate.analyses.base.run`."""

from .ablation import Ablation
from .base import Experiment, Unit, run
from .cross_attention import CrossAttention
from .gate_scan import GateScan
from .modality_gap import ModalityGap
from .overlap import Overlap
from .patching import Patching
from .steering import Steering

EXPERIMENTS: dict[str, type[Experiment]] = {
    e.name: e for e in (ModalityGap, CrossAttention, Overlap, Ablation, Patching, Steering, GateScan)
}

__all__ = ["EXPERIMENTS", "Experiment", "Unit", "run"]
