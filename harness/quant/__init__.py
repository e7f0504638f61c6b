"""Quantized GGUFs: made by llama.cpp's own quantizer, read back as the reference's weights."""
