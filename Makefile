# Two entry points, each setting up everything on a fresh machine:
#   make demo   trains the generated demo CNN (deterministically), converts it
#               (PowerQuant and uniform, W4/A4, calibrated and refined) and
#               prints float vs quantized accuracy
#   make test   lints (ruff, configured in pyproject.toml) and runs the test suite
# Both create the virtualenv $(VENV) and install the project into it first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := build/demo

.PHONY: demo test clean

$(VENV)/.installed: setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m keras_powerquant.demo $(DEMO)
	$(BIN)/kpq convert $(DEMO)/model.keras -o $(DEMO)/powerquant --wbits 4 --abits 4 \
		--calibration-data $(DEMO)/calibration.npy --refine --overwrite
	$(BIN)/kpq convert $(DEMO)/model.keras -o $(DEMO)/uniform --wbits 4 --abits 4 --method uniform \
		--calibration-data $(DEMO)/calibration.npy --refine --overwrite
	$(BIN)/kpq evaluate $(DEMO)/model.keras $(DEMO)/uniform $(DEMO)/powerquant --data $(DEMO)/test.npz

# The second run repeats the whole suite on TensorFlow's plain CPU kernels, the
# ones a CPU without AVX-512 gets, which refuse some configurations oneDNN runs
# (tests whose float reference they refuse skip, saying so: tests/cpu_kernels.py).
test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest
	TF_ENABLE_ONEDNN_OPTS=0 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build
