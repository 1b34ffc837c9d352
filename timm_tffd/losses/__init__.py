"""Tf-FD loss functions on lists of NCHW features (shallow to deep)."""
from .inter import aligned_pairs, inter_layer_loss, inter_layer_pairs
from .intra import intra_layer_loss, intra_stage_loss
from .saliency import SALIENCY, bn_scale_saliency, get_saliency

__all__ = ['aligned_pairs', 'inter_layer_loss', 'inter_layer_pairs', 'intra_layer_loss', 'intra_stage_loss', 'SALIENCY',
           'bn_scale_saliency', 'get_saliency']
