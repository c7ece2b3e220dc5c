"""Side-by-side performance measurements; each script writes results/bench/<name>.json (`make bench`)."""
