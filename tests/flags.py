"""XLA settings the test session and the processes it starts share."""

# XLA:CPU's LLVM optimisation level: 0 compiles a train step in two thirds of the time.
FAST_COMPILE = "--xla_backend_optimization_level=0"
