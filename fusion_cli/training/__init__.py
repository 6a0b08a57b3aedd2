"""Training FusionMamba on real scenes through Wald's protocol, and target-adaptive fine-tuning.

`data` builds training pairs and patches, `loop` trains and exports with a model card, `adapt`
fine-tunes a model on the scene it is about to fuse.
"""
