"""The reliability suite: faults, races, bad input and security, with invariants checked after each run."""
