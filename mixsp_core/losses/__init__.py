"""Training losses, one module each; every class's docstring says what it expects."""

from mixsp_core.losses.cosent import CoSENTLoss
from mixsp_core.losses.definition import DefinitionLoss
from mixsp_core.losses.distill import DistillLoss, fit_pca_projection
from mixsp_core.losses.infonce import InfoNCELoss
from mixsp_core.losses.listwise import ListwiseRankLoss
from mixsp_core.losses.multi_positive_infonce import MultiPositiveInfoNCELoss
from mixsp_core.losses.modulus import ModulusLoss
from mixsp_core.losses.pearson import PearsonLoss
from mixsp_core.losses.rank_kl import RankKLLoss
from mixsp_core.losses.routing import PUBLISHED_CLASS_COUNTS, RoutingLoss
from mixsp_core.losses.score_bce import ScoreBCELoss
from mixsp_core.losses.similarity_distill import SimilarityDistillLoss
from mixsp_core.losses.simcse import SimCSELoss  # 2-Tier SimCSE

__all__ = [
    "CoSENTLoss", "DistillLoss", "InfoNCELoss", "ListwiseRankLoss", "ModulusLoss", "PearsonLoss", "RankKLLoss",
    "RoutingLoss", "ScoreBCELoss", "SimilarityDistillLoss", "PUBLISHED_CLASS_COUNTS", "fit_pca_projection",
    "MultiPositiveInfoNCELoss",
    "DefinitionLoss",  # DefSent+
    "SimCSELoss",  # 2-Tier SimCSE
]
