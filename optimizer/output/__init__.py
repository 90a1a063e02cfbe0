"""What the user takes away: the exported repository, deployment manifests, the served result."""
