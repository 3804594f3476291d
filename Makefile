# Two commands do everything on a fresh machine; both create .venv on first use.
#   make book   execute every chapter (papermill, profile auto) and build the HTML book
#   make test   unit tests and every chapter in the quick profile
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: book test html clean

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	touch $@

book: $(VENV)/.installed
	$(PY) -m flatnb.book $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -ra $(ARGS)

# build the HTML from the outputs stored in the notebooks, strictly (warnings are errors)
html: $(VENV)/.installed
	$(PY) -m flatnb.book --no-execute

clean:
	rm -rf _build
