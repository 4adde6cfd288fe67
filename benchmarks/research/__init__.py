"""The research reproduction behind ``benchmarks/reproduce_research.py`` (the command line), one job per module:

- ``runs.py``: the plan's sizes, the task, and one training or probe run in its own process (the workers);
- ``pool.py``: the process pool that trains runs, up to ``--parallel`` at once, and resumes or adopts them;
- ``experiments.py``: the five experiments, the runs they share and their tables;
- ``plots.py``: their figures; ``summary.py``: the summary page and the number formats of the tables.

The modules import ``_common`` as the benchmark scripts do (the entry script puts ``benchmarks/`` on ``sys.path``).
"""
