"""Config checks, one home: every rule about a run config or a sweep file, collected and raised once."""
