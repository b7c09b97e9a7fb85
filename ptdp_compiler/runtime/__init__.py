"""Runtime: mesh, launch, executor, data-parallel gradient sync, RNG streams."""
