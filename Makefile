# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint benchmark dist constraints clean

# The package declares compatible ranges; constraints.txt holds the versions tested together.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/inpformer demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks .ci

benchmark: $(STAMP)
	$(PY) benchmarks/accuracy.py

# A wheel and an sdist in dist/ (the wheel built from the sdist, so the sdist is known to build).
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --quiet --outdir dist .

# Pin what .venv holds now (dev extra included) as the tested versions; run it after installing new versions,
# e.g. `.venv/bin/pip install -U -e '.[dev]'`.
constraints:
	echo "# Versions tested together (make test, .ci/run), written by 'make constraints' on $$($(PY) -V), $$(uname -s)." \
	    > constraints.txt
	$(PY) -m pip list --format=freeze --exclude-editable --exclude pip --exclude setuptools >> constraints.txt

clean:
	rm -rf runs dist .pytest_cache .ruff_cache
