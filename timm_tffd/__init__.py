"""timm_tffd: Teacher-free Feature Distillation for timm models."""
from .criterion import TfFDLoss, TfFDSchedule
from .features import FeatureTaps, resolve_stages
from .losses import inter_layer_loss, intra_layer_loss, inter_layer_pairs, get_saliency, SALIENCY
from .methods import MethodContext, get_method, list_methods, register_method
from .task import TfFDTask
from .version import __version__
from .wrap import get_tffd_state, is_wrapped, unwrap, wrap
