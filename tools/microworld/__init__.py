"""The micro-world: a procedurally drawn, captioned image world, and the small SD1.5-layout
checkpoint pretrained on it (see docs/microworld.md)."""
