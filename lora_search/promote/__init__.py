"""After the search: the best trials trained in full, the merge, the benchmark, what the adapter learned."""
