"""Engine: seeding, feature cache, training loop, evaluation, run records."""
from .cache import FeatureCache, cache_key, cached_features, encode_items, items_digest
from . import distributed
from .evaluate import batched, classification_metrics, cosine_logits
from .runs import load_records, run_dir, write_record
from .seed import seed_everything
from .train import TrainConfig, Trainer, build_optimizer, index_batches, lr_at

__all__ = [
    "FeatureCache", "TrainConfig", "Trainer", "batched", "build_optimizer", "cache_key", "cached_features",
    "classification_metrics", "cosine_logits", "encode_items", "index_batches", "items_digest", "load_records",
    "lr_at", "run_dir", "seed_everything", "write_record",
]
