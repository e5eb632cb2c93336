# `make bench-trainer`: real tokens/s of the Kubetune trainer vs a stock HF Trainer + PEFT script.
# On a GPU machine: make bench-trainer BENCH_ARGS="--device cuda --model llama3-8b-shape --steps 40"
.PHONY: bench-trainer

BENCH_ARGS ?= --device cpu --model tiny --steps 30

bench-trainer: venv ## Trainer throughput vs HF Trainer + PEFT, as a markdown snippet (BENCH_ARGS=...)
	$(PY) bench/bench_trainer.py $(BENCH_ARGS)
