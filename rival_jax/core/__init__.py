"""The pure JAX core: DDIM, the UNet call, cross-image attention, inversion, the exemplar's side, aligned
generation and device parallelism. Functions of modules, params and arrays; no files, no prompts."""
