# The two commands of the README. Each does all the set-up it needs (idempotent, quick when done).
.PHONY: setup run test test-fast lint clean

setup:
	bash scripts/setup.sh

run: setup  ## main job: the embedded default study end to end -> reports/locality.pdf
	. .venv/bin/activate && snakemake --cores all

test: setup  ## the whole test suite (what CI runs)
	. .venv/bin/activate && python -m pytest -q

test-fast: setup  ## unit tests only (no Snakemake / SLURM end-to-end runs)
	. .venv/bin/activate && python -m pytest -q -m "not slow and not slurm"

lint: setup
	. .venv/bin/activate && snakemake --lint

clean:
	rm -rf results reports/*.pdf .snakemake
