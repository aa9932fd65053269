"""The one training loop, its batched engine, and the whole-network method built on them."""
