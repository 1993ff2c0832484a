"""Former home of the evaluate stage's metrics, now `sdflow.evaluation`; kept so imports work."""

from sdflow.evaluation.clip import load_clip, make_clip_score
from sdflow.evaluation.features import (
    INCEPTION_FILE,
    INCEPTION_LABEL,
    INCEPTION_URL,
    RANDOM_CNN_LABEL,
    RandomCNNFeatures,
    decode_image,
    ensure_inception_weights,
    feature_label,
    feature_note,
    inception_weights_path,
    to_uint8,
)

fid_label, fid_note = feature_label, feature_note

__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_LABEL",
    "INCEPTION_URL",
    "RANDOM_CNN_LABEL",
    "RandomCNNFeatures",
    "decode_image",
    "ensure_inception_weights",
    "feature_label",
    "feature_note",
    "fid_label",
    "fid_note",
    "inception_weights_path",
    "load_clip",
    "make_clip_score",
    "to_uint8",
]
