"""Models: components built from config or loaded (diffusers, transformers), the tokenizer, the hub
resolver, the trainable model (adapters, weights from a checkpoint) and one module per model family."""
