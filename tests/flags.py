"""XLA settings the test session and the processes it starts share."""

# Compiling is most of the suite's time on a CPU and the tests' programs are small, so both settings
# give up run time the tests barely spend for compile time: LLVM optimisation level 0, and XLA:CPU's
# loop emitters instead of its MLIR fusion emitters. A micro distillation step compiled in a fresh
# process: 31 s at the defaults, 20 s at level 0, 10-12 s with both; the random initialisation
# before it (an eager compilation per op) 23 s, 15 s, 8-10 s; the step's loss the same to the last
# digit in all three.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
