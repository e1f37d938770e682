"""gemma-edge: take small Gemma models to phones, Raspberry Pis and laptops, and prove they are still Gemma."""

__version__ = "0.1.0"
