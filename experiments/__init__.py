"""Experiments that put the seed articles' claims about batch normalization to a measured test.

``python -m experiments`` runs every claim at reduced size; ``python -m experiments --help``
documents the command line. The pieces, each usable on its own:

- :mod:`experiments.data`: datasets that need no download (digits, MNIST-1D, IDX files);
- :mod:`experiments.models`: flax.linen MLP and small CNN with the norm layer chosen by name;
- :mod:`experiments.train`: the jitted step of a group of runs and its :class:`Trainer`;
- :mod:`experiments.loop`: the one training loop, ``train_and_evaluate(config, workdir)``,
  with its logging and checkpoints;
- :mod:`experiments.claims`: one module per claim, each declaring its runs and its verdict;
- :mod:`experiments.verdict`: the rule that turns per-seed numbers into a verdict;
- :mod:`experiments.suite`: claims run into one directory, ``results.json`` with provenance;
- :mod:`experiments.report`: ``results.json`` → plots and ``report.md``;
- :mod:`experiments.docs`: the docs' results, bench tables and figures from
  ``experiments/reference/``.
"""
