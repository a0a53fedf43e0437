"""Jobs the CLI runs around the pipeline: `generate` (one exemplar) and `augment` (manifests, resumable)."""
