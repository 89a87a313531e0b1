"""PyTorch <-> JAX: key tables, checkpoint files, the merge into a PyTorch checkpoint, and the PyTorch
twins of the student that run it inside upstream sam3. The only package that imports torch."""
