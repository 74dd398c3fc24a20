"""Quantized drop-in modules and the math behind them."""
