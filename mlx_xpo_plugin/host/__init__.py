"""The plugin host and the start-up hook: hook specs, the registry, this project's own hook
implementations (builtins) and the activation in a stock mlx-lm-lora."""
