"""The top floor: Hydra configuration, data, the DeepSpeed engine and loop, and the CLI."""
