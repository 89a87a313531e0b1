# Every target bootstraps .venv on first use; `make test` is what CI runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pytest processes for `make test`: compiling dominates the suite and is single-threaded, so one per
# core; each holds a few GiB at most.
WORKERS ?= 2
# glibc backs large allocations with transparent huge pages: XLA:CPU's per-run buffers then cost a
# fault per 2 MiB instead of per 4 KiB (es3_jax/cli.py asks for the same when a command starts).
HUGE_PAGES := glibc.malloc.hugetlb=1

.PHONY: test test-slow lint demo demo-report parity-sweep clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# jax2onnx's metadata pins an older orbax-checkpoint than es3's; the export needs none of its
	# dependencies beyond the onnx extra (pyproject.toml).
	$(BIN)/python -m pip install --quiet --no-deps jax2onnx==0.17.1
	# JAX's CUDA plugin, with which the tests compile es3's programs for GPUs that are not here
	# (benchmarks/gpu_targets.py). Kept apart from the venv's packages, in a folder only the tests
	# put on their path: in the venv, JAX would probe for CUDA at every start of every command.
	$(BIN)/python -m pip install --quiet --no-deps --upgrade --target $(VENV)/cuda-plugin \
		jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
	# The numerics tests run a second time as an AVX2 processor would (tests/test_cpus.py), under
	# qemu's user-mode emulator: installed here where make runs as root on Debian or Ubuntu on an
	# AVX-512 machine; elsewhere that test says why it was skipped.
	command -v qemu-x86_64 >/dev/null || ! grep -qw avx512f /proc/cpuinfo || [ "$$(id -u)" != 0 ] \
		|| ! command -v apt-get >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-user >/dev/null; } \
		|| echo "qemu-user could not be installed: tests/test_cpus.py will be skipped"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check es3_jax porting benchmarks scripts tests
	$(BIN)/lint-imports
	GLIBC_TUNABLES=$(HUGE_PAGES) $(BIN)/python -m pytest -q -m "not slow" -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -s -m slow

lint: $(STAMP)
	$(BIN)/ruff check es3_jax porting benchmarks scripts tests
	$(BIN)/lint-imports

# The tests marked MARKER over SEEDS fresh seeds, as this processor (ISA=native) or an emulated AVX2
# one (ISA=avx2) computes them; the worst figure per test against its tolerance.
SEEDS ?= 20
ISA ?= native
MARKER ?= parity
parity-sweep: $(STAMP)
	$(BIN)/python -m tests.parity_sweep --seeds $(SEEDS) --workers $(WORKERS) --isa $(ISA) -m "$(MARKER)" --output parity_sweep_$(ISA).md

demo: $(STAMP)
	$(BIN)/es3 demo

# The demo once per seed, then its judged figures into docs/demo.md and README.md. Fails (after
# writing the report) when a run misses a target.
DEMO_SEEDS ?= 0 1 2
demo-report: $(STAMP)
	status=0; for s in $(DEMO_SEEDS); do $(BIN)/es3 demo --seed $$s --output_dir output/demo-seed$$s || status=1; done; \
	$(BIN)/es3 demo --report docs/demo.md README.md --from $(foreach s,$(DEMO_SEEDS),output/demo-seed$(s)/summary.json) \
		&& exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
