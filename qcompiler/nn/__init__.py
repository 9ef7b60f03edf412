"""Layers that have no ``torch.nn`` counterpart (the tracer keeps them as leaves), and module-mode helpers (:mod:`.modes`)."""

from .adder import AdderConv2d, adder_conv2d, adder_conv2d_train

__all__ = ["AdderConv2d", "adder_conv2d", "adder_conv2d_train"]
