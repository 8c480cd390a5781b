"""absl-flag experiments with ml_collections configs."""
