# The two commands of the README. Each does all the set-up it needs (idempotent, quick when done).
.PHONY: setup slurm-cluster run run-seeds rehearse test test-fast lint benchmark benchmark-full cost clean

setup:
	bash scripts/setup.sh

run: setup  ## main job: the embedded default study end to end -> reports/locality.pdf
	. .venv/bin/activate && snakemake --cores all

test: setup slurm-cluster  ## the whole test suite (what CI runs)
	. .venv/bin/activate && python -m pytest -q

# A real single-node SLURM cluster on localhost for the SLURM tests (needs root or sudo; required under CI,
# otherwise best effort: without it the SLURM tests are skipped with the reason).
slurm-cluster:
	@if [ -n "$$CI" ]; then bash scripts/slurm-local.sh start; \
	else bash scripts/slurm-local.sh start || echo "[make] no local SLURM cluster: SLURM tests will be skipped"; fi

run-seeds: setup  ## CPU-scale studies of papers 000-004 on top of the default
	. .venv/bin/activate && snakemake --cores all --configfile config.yaml workflow/configs/cpu-seeds.yaml

# A paper config's whole workflow at toy sizes on this machine (README "Rehearsal"):
#   make rehearse PAPER=paper-004        -> results/rehearsal/paper-004/reports/*.pdf
PAPER ?= paper-004
rehearse: setup  ## rehearse PAPER's DAG end to end through workflow/configs/rehearsal.yaml (minutes, CPU)
	. .venv/bin/activate && snakemake --cores all --configfile workflow/configs/$(PAPER).yaml workflow/configs/rehearsal.yaml

test-fast: setup  ## unit tests only (no Snakemake / SLURM end-to-end runs)
	. .venv/bin/activate && python -m pytest -q -m "not slow and not slurm"

benchmark: setup  ## attention / training / sampling throughput, tiny size (seconds) -> results/benchmark
	. .venv/bin/activate && python scripts/benchmark.py --size tiny --out results/benchmark

benchmark-full: setup  ## the documented full run (DiT-XS/1, DiT-S/1, UNet-004 at 32x32x3; ~20 min on 2 CPU cores)
	. .venv/bin/activate && python scripts/benchmark.py --size full --out results/benchmark-full

# GPU-hours of a config before running it: make cost CONFIG=workflow/configs/paper-004.yaml [TFLOPS=200 | BENCHMARK=results/benchmark-full/training.parquet]
CONFIG ?= config.yaml
cost: setup  ## training and evaluation GPU-hours of CONFIG (FLOP counts x a throughput; no job runs)
	. .venv/bin/activate && python -m diffbias cost --configfile $(CONFIG) $(if $(TFLOPS),--throughput-tflops $(TFLOPS)) $(if $(BENCHMARK),--benchmark $(BENCHMARK))

lint: setup
	. .venv/bin/activate && snakemake --lint

clean:
	rm -rf results reports/*.pdf .snakemake
