"""mlx-xpo-plugin: XPO and Online DPO train modes for mlx-lm-lora."""

__version__ = "0.1.0"
