"""Optional integrations with other libraries, each importing its library only when
imported itself (``import gradhooks`` never does):

- :mod:`gradhooks.integrations.transformers`: Hugging Face ``Trainer`` subclasses
  for DP-SGD (``DPTrainer``) and per-sample gradient diagnostics
  (``PerSampleStatsTrainer``).
"""
