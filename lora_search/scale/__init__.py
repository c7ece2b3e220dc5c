"""Many workers on one study: storages, worker processes, trial slots, the promotion claim."""
