"""A point of the search space becomes a Triton model config: the space, the rendering, the repository."""
