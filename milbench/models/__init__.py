"""Model zoo: one module per model (or family), built from blocks.py."""
