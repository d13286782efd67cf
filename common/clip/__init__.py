"""CLIP backbone layer: loader, prompt text encoder, visual hooks, zero-shot head."""
from .loader import ClipBundle, WeightsNotFoundError, file_sha256, load_clip, save_clip_checkpoint
from .registry import EMBEDDED_ARCHS
from .text import PromptTextEncoder, tokenize
from .visual import (encode_image_hooked, is_resnet, is_vit, resnet_dense_features, resnet_feature_map, vit_depth,
                     vit_width)
from .zeroshot import IMAGENET_TEMPLATES, encode_texts, logit_scale, pooled_classifier, zeroshot_classifier

__all__ = [
    "ClipBundle", "EMBEDDED_ARCHS", "IMAGENET_TEMPLATES", "PromptTextEncoder", "WeightsNotFoundError",
    "encode_image_hooked", "encode_texts", "file_sha256", "is_resnet", "is_vit", "load_clip", "logit_scale",
    "pooled_classifier", "resnet_dense_features", "resnet_feature_map", "save_clip_checkpoint", "tokenize", "vit_depth",
    "vit_width", "zeroshot_classifier",
]
