"""Model making: presets of real architectures' shapes, random weights, and the tokenizer they use."""
