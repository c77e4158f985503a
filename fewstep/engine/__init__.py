"""The one training engine every method runs on: options, context, loop, checkpoints.

A method (methods/*.py) says which networks it trains, which of them update at each iteration
and with what loss; the engine owns everything around that (optimisers, two-time-scale plans,
clipping, EMA, autocast, LoRA, data parallel, checkpoints and signals), so differences between
methods come from the methods (NVlabs EDM style: loss, network wrapper and loop kept apart).
"""
