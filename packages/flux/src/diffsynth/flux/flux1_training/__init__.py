"""The training modes of FLUX.1's training task (`diffsynth.flux.training.FluxTrainingTask`), one module each.

Each module holds one mode's row columns, checks, encoding and model-call pieces as functions taking the task;
`FluxTrainingTask` calls them from its protocol methods (`encode`, `collate`, `velocity`, ...).
"""
