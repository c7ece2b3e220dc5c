"""The configuration: typed schemas, Hydra composition of conf/ and the sweep files, the search space, the objectives."""
