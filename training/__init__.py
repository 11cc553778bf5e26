"""Training the built-in model (wanfit.builtin) on synthetic clips: see docs/builtin_model.md."""
