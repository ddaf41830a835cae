"""Training/evaluation machinery that does not depend on the model or the data:
config loading, checkpoints, LR schedule, weight averaging, distributed helpers,
metrics, logging and the zero-shot protocol splits.
"""
