"""The benchmark suite: ``python benchmarks/run.py`` measures the engine; ``plans.py`` explains its SQL."""
