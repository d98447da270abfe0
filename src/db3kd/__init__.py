"""db3kd: decision-based black-box knowledge distillation."""

__version__ = "0.1.0"
