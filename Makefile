# Two set-up commands (see README): `make demo` runs the main job, `make test` the tests.
# Each creates .venv, installs CPU torch first (the 2.13.0 build that lies on disk here, so no
# multi-GB CUDA build is pulled), then pvae with its test extras, then the data.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
FASHION = /usr/share/datasets/fashion-mnist
EPOCHS ?= 10
RUN    ?= runs/demo

.PHONY: demo test venv data bench lint clean mutation

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q "torch>=2.2"
	$(BIN)/pip install -q -e ".[dev,extras]"
	touch $@

venv: $(BIN)/.installed

# Fashion-MNIST from Debian's package when we are root; otherwise say what to do.
data:
	@if [ -f $(FASHION)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST found in $(FASHION)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "could not install dataset-fashion-mnist"; \
	else echo "Fashion-MNIST not found and not root: run 'sudo apt-get install dataset-fashion-mnist' or set PVAE_DATA_DIR"; fi

demo: venv data
	@if [ -f $(FASHION)/train-images-idx3-ubyte.gz ] || [ -n "$$PVAE_DATA_DIR" ]; then ds=fashion-mnist; \
	else echo ">>> Fashion-MNIST is not available: falling back to scikit-learn's bundled 8x8 digits"; ds=digits; fi; \
	rm -rf $(RUN) && \
	$(BIN)/pvae train --dataset $$ds --model vae --latent-dim 50 --hidden-dims 400 \
	  --likelihood bernoulli --binarize dynamic --num-epochs $(EPOCHS) --batch-size 256 \
	  --device auto --out $(RUN) && \
	$(BIN)/pvae evaluate $(RUN) --num-samples 5000 --iw-num-test 1000

test: venv data
	$(BIN)/ruff check pvae tests examples benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n auto --maxprocesses 8 --dist worksteal --durations=15

bench: venv data
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_iwll.py
	$(BIN)/python benchmarks/bench_estimators.py

# The mutation score of the numeric core ([tool.mutmut] in pyproject.toml; not part of CI: over
# two hours on 2 cores). MUTANTS='pvae.stats*' (names or globs) runs a part. Survivors:
# `$(BIN)/mutmut results`, each killed by a test or explained in tests/equivalent_mutants.md.
MUTANTS ?=
mutation: venv
	$(BIN)/pip install -q "mutmut==3.8.1"
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children $$(nproc) $(MUTANTS)
	$(BIN)/mutmut export-cicd-stats
	$(BIN)/python -c "import json; s = json.load(open('mutants/mutmut-cicd-stats.json')); \
	  caught = s['killed'] + s['timeout']; \
	  tested = caught + s['survived'] + s['no_tests'] + s['suspicious'] + s['segfault']; \
	  print(f'mutation score: {caught} of {tested} mutants run caught ({100 * caught / tested:.1f}%)', s)"

clean:
	rm -rf $(VENV) runs *.egg-info mutants
