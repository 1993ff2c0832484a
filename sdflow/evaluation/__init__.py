"""Evaluation metrics: feature networks, distribution distances, CLIP, and scoring models.

- `features`: the feature networks (Inception with hash-checked weights, or the offline random CNN).
- `distribution`: FID, KID, precision/recall, density/coverage and CMMD from feature vectors.
- `clip`: CLIP loading, embeddings and CLIP score.
- `scoring`: one pass per network over each model's images, every metric from those vectors.
"""
