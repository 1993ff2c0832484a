"""The stage-output contract, written once: content keys, atomic stage directories with the manifest
last, row-level reuse, shard mapping, checkpoints inside a stage, gc."""
