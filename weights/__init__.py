"""Shipped model cards (`*.json`) and weights (`*.safetensors`), installed as `fusion_cli.weights`."""
