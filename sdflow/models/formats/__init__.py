"""Model formats beyond the diffusers folder: the single-file checkpoint in the original Stable
Diffusion key layout (`single_file`), kohya-format LoRAs (`kohya`) and the Hugging Face model card
(`card`). One function per direction; a family says which formats it supports and gives its key
prefixes (`sdflow.models.families`)."""
