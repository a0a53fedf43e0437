"""Dataset input and output of augmentation jobs: sources, output sinks and storage by path or URL."""
