# `make bench-trainer`: real tokens/s of the Kubetune trainer vs a stock HF Trainer + PEFT script.
# On a GPU machine: make bench-trainer BENCH_ARGS="--device cuda --model llama3-8b-shape --steps 40"
# `make bench-operator`: the operator with 100/400/1,000 FineTuneJobs on the local control plane.
# Another checkout's operator: make bench-operator BENCH_OPERATOR_ARGS="--operator-src /tmp/kt-before"
.PHONY: bench-trainer bench-operator

BENCH_ARGS ?= --device cpu --model tiny --steps 30
BENCH_OPERATOR_ARGS ?= --jobs 100,400,1000 --window 60

bench-trainer: venv ## Trainer throughput vs HF Trainer + PEFT, as a markdown snippet (BENCH_ARGS=...)
	$(PY) bench/bench_trainer.py $(BENCH_ARGS)

bench-operator: venv control-plane ## Operator latency, CPU, RSS, API requests at 100-1,000 jobs (BENCH_OPERATOR_ARGS=...)
	$(PY) bench/bench_operator.py $(BENCH_OPERATOR_ARGS)
