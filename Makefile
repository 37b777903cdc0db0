# The two commands of the README: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test default-model
setup:
	./scripts/setup.sh

demo: setup
	$(BIN)/ros-anomaly-diffusion demo $(ARGS)

# PYTHONFAULTHANDLER: a crash in native code, even at interpreter exit after pytest has put its
# own fault handler away, prints every thread's Python stack instead of a bare "Segmentation fault".
test: setup
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest test $(ARGS)

# The model shipped in ros_anomaly_diffusion/models/default (MODEL_CARD.md): knn on the RUGD sample.
default-model: setup
	$(BIN)/ros-anomaly-diffusion train --variant knn --data ../shared/data/rugd-sample \
		--out ros_anomaly_diffusion/models/default --seed 0
