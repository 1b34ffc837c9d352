"""timm_tffd: Teacher-free Feature Distillation (and its family) as drop-in regularizers for timm models."""
from . import models  # registers the CIFAR zoo with timm
from .checkpoint import AtomicCheckpointSaver
from .config import TfFDConfig
from .criterion import TfFDLoss
from .data.embedded import EMBEDDED_DATA_CONFIG, EmbeddedFashionMNIST
from .data.subset import SampledSubset
from .features import FeatureTaps, resolve_stages
from .hub import push_to_hub
from .integrators import AttentionIntegration, LayerwiseIntegration, ReceptiveFieldIntegration, create_integrator
from .kd import TfFDFeatureDistillationTask, TfFDLogitDistillationTask, TfFDTokenDistillationTask
from .loss_meter import LossMeter
from .losses import SALIENCY, get_saliency, inter_layer_loss, inter_layer_pairs, intra_layer_loss
from .losses.emd import emd_l2, emd_layer_loss, sinkhorn_plan
from .losses.many_to_one import many_to_one_loss
from .losses.margin import EmpiricalMargin, MarginL2Loss, bn_margin, margin_l2_loss
from .losses.smoothing import DynamicLabelSmoothingCrossEntropy, label_smoothing_cross_entropy, scheduled_smoothing
from .methods import MethodContext, get_method, list_methods, register_method
from .pretrained import HUB_ORG, create_model, list_pretrained, resolve_pretrained_name
from .self_distill import SelfDistill, parse_tau
from .sfd import SFDTask, SFDTrainableModule
from .task import TfFDTask, TfFDTaskMixin
from .teacher import SFDTeacher, create_teacher, load_teacher_checkpoint
from .version import __version__
from .wrap import (
    diagnose_nonfinite, get_tffd_state, is_wrapped, nonfinite_stages, record_forward, tapped_features, unwrap, wrap)
