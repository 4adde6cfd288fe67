"""The "choose by" experiment (issue 18): full finetuning vs LoRA vs sparse_rl on SmolLM2-135M-Instruct, with
learning-rate sweeps, seeds, bootstrap intervals and a second task. ``benchmarks/choose_by.py`` is the command;
this package holds its parts: ``tasks`` (the two verifiable tasks), ``evaluate`` (held-out sampled reward per
prompt), ``runs`` (one GRPO run -> one JSON), ``plan`` (which runs, in which order), ``stats`` (bootstrap) and
``report`` (markdown + plot)."""
