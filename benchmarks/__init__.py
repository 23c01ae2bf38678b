"""The benchmark suite: ``run.py`` measures, ``plans.py`` explains the SQL, ``profile_drain.py`` profiles."""
