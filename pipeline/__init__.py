"""sinkprune's library, in layers: maths (pure tensors) < run (outputs, phase, strategy) < model < evaluation.

Nothing here imports upward, and nothing imports `callbacks/` (which sits above all of it).
"""
