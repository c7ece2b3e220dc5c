"""sweep.promotion: which entries are settings of the promotion (not config keys) and their defaults."""

SETTINGS = ("select", "top_k", "seeds")  # sweep.promotion entries that are settings of the promotion, not config keys
TOP_K, SEEDS = 3, 1  # the defaults: the 3 best trials re-trained at the full budget, one seed each
