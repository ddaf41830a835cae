"""The machinery that runs STDD: what the command lines (``stdd.train``, ``stdd.eval``,
``stdd.predict``, ``stdd.demo``) import; they never import each other.

Not model-free: it is where configs meet the model (``stdd.model``) and the data
(``stdd.data``). Model- and data-free parts: ``config`` (the typed run configs),
``checkpoint`` (checkpoints and weights files), ``distributed``, ``schedule``,
``averaging``, ``metrics``, ``protocols``, ``runlog``, ``precision`` (autocast).
The parts that build or run models: ``task`` (config -> model, prompts, datasets,
phase sampler), ``trainer`` (the training run), ``evaluation`` (scoring every view
of a dataset), ``inference`` (a model from weights, for evaluation and prediction),
``comparison`` (the demo: STDD vs frame-only).
"""
