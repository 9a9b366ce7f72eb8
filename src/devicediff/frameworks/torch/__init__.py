"""PyTorch: ``backend`` (a run: settings, model, step, evaluation, checkpoints) and
``lockstep`` (the side of ``devicediff diverge``: recorders, teacher forcing, float64 reference)."""
