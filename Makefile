# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench bench-stereo bench-peers stereo clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the local CPU build, so nothing can swap in a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,stereo,export,hls4ml,sparse]'
	$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch was replaced: ' + v)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/prunq compress recipes/digits.yaml --out runs/demo --overwrite --resume

# The paper's target task: StereoNet trained on synthetic scenes, 95 % sparse, w4a8 (about 20 min on 2 cores).
stereo: $(STAMP)
	$(BIN)/prunq compress recipes/stereo.yaml --out runs/stereo --overwrite --resume

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python bench/digits.py

# Stereo grid + StereoSGBM reference, from the dense model `make stereo` trained (see bench/stereo.py); one
# process per method, one thread each. The `make stereo` run itself is kept as bench/results/stereo_run/.
bench-stereo: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	test -f runs/stereo/dense.safetensors || $(MAKE) stereo
	rm -rf bench/results/stereo_run && mkdir -p bench/results/stereo_run
	cp -r runs/stereo/metrics.json runs/stereo/recipe.yaml runs/stereo/report.md runs/stereo/plots bench/results/stereo_run/
	$(BIN)/python bench/stereo.py --dense runs/stereo/dense.safetensors --methods taylor-soft --threads 1 \
	  --name stereo_taylor-soft --quiet & pid=$$!; \
	$(BIN)/python bench/stereo.py --dense runs/stereo/dense.safetensors --methods magnitude-hard --threads 1 \
	  --name stereo_magnitude-hard --quiet; b=$$?; wait $$pid && test $$b -eq 0
	$(BIN)/python bench/stereo.py --combine stereo_taylor-soft stereo_magnitude-hard --name stereo

# prunq beside torch.nn.utils.prune + QAT, NNCF, Torch-Pruning and Brevitas on both tasks (bench/peers.py), from
# the committed dense StereoNet (the one `make stereo` trained for bench/results/stereo_run). Two one-thread
# processes: the stereo grid (+ Torch-Pruning, which needs its BOPs), then digits seed 2 | the other stereo
# peers, then digits seeds 0 and 1; then the joins, the analysis and the README section (about 40 min).
STEREO_DENSE := bench/assets/stereo_dense.safetensors
PEERS := $(BIN)/python bench/peers.py --threads 1 --quiet
bench-peers: $(STAMP)
	$(BIN)/pip install -q -e '.[peers]'
	{ $(PEERS) --task stereo --part prunq --dense $(STEREO_DENSE) && $(PEERS) --task digits --seed 2; } & pid=$$!; \
	{ $(PEERS) --task stereo --part peers --dense $(STEREO_DENSE) && $(PEERS) --task digits --seed 0 && \
	  $(PEERS) --task digits --seed 1; }; b=$$?; wait $$pid && test $$b -eq 0
	$(BIN)/python bench/peers.py --combine peers_digits_seed0 peers_digits_seed1 peers_digits_seed2
	$(BIN)/python bench/peers.py --combine peers_stereo_prunq peers_stereo_peers --readme digits stereo

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
