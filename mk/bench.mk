# `make bench-trainer`: real tokens/s of the Kubetune trainer vs a stock HF Trainer + PEFT script.
# On a GPU machine: make bench-trainer BENCH_ARGS="--device cuda --model llama3-8b-shape --steps 40"
# Loss-kernel memory on CPU: make bench-trainer BENCH_ARGS="--model tiny-32k --seq-len 2048 --batch-size 2 --loss-kernels chunked,full --steps 6 --warmup 2"; on one H200: bench/gpu.sh
# `make bench-data`: tokenizing 200,000 and 1,000,000 chat records, Kubetune (first run, cached) vs HF datasets.
# A quick try: make bench-data BENCH_DATA_ARGS="--records 20000,100000"
# `make bench-operator`: the operator with 100/400/1,000 FineTuneJobs on the local control plane.
# Another checkout's operator: make bench-operator BENCH_OPERATOR_ARGS="--operator-src /tmp/kt-before"
# A new job's start among 1,000 live ones (100 new at 2/s), beside the burst:
#   make bench-operator BENCH_OPERATOR_ARGS="--mode burst,steady --jobs 1000 --live 1000 --new 100 --rate 2"
# `make bench-sweep`: CPU-s and best validation loss of TPE + ASHA vs TPE without pruning vs random search (tiny task).
# A quick try: make bench-sweep BENCH_SWEEP_ARGS="--trials 6 --seeds 0"
# `make bench-startup`: a trainer process's fixed cost per entry point (validation pod, training pod, kubetune run).
# Against another checkout: make bench-startup BENCH_STARTUP_ARGS="--src /tmp/kt-before --src . --repeat 5"
# `make bench-trial-cost`: a sweep trial's fixed cost on the local control plane (the real trainer), with the image's
# metrics linger (30 s) and with the operator's 0 (the chart's PodMonitor off). Quick: BENCH_TRIAL_COST_ARGS="--trials 2"
.PHONY: bench-trainer bench-data bench-operator bench-sweep bench-startup bench-trial-cost

BENCH_ARGS ?= --device cpu --model tiny --steps 30
BENCH_DATA_ARGS ?= --records 200000,1000000
BENCH_OPERATOR_ARGS ?= --jobs 100,400,1000 --window 60
BENCH_SWEEP_ARGS ?= --trials 12 --steps 27 --seeds 0,1,2,3
BENCH_STARTUP_ARGS ?= --repeat 3
BENCH_TRIAL_COST_ARGS ?= --trials 4 --steps 30

bench-trainer: venv ## Trainer throughput vs HF Trainer + PEFT, as a markdown snippet (BENCH_ARGS=...)
	$(PY) bench/bench_trainer.py $(BENCH_ARGS)

bench-data: venv ## Data path time and peak RSS at 200k/1M chat records vs HF datasets (BENCH_DATA_ARGS=...)
	$(PY) bench/bench_data.py $(BENCH_DATA_ARGS)

bench-operator: venv control-plane ## Operator latency, CPU, RSS, API requests at 100-1,000 jobs; --mode steady: start latency among 1,000 (BENCH_OPERATOR_ARGS=...)
	$(PY) bench/bench_operator.py $(BENCH_OPERATOR_ARGS)

bench-sweep: venv ## Sweep compute to the best loss: TPE + ASHA vs no pruning vs random, on CPU (BENCH_SWEEP_ARGS=...)
	$(PY) bench/bench_sweep.py $(BENCH_SWEEP_ARGS)

bench-startup: venv ## A trainer process's fixed cost (wall, CPU-s, before the first and after the last step) per entry point (BENCH_STARTUP_ARGS=...)
	$(PY) bench/bench_startup.py $(BENCH_STARTUP_ARGS)

bench-trial-cost: venv control-plane ## A sweep trial's fixed cost on the local control plane, image linger vs 0 (BENCH_TRIAL_COST_ARGS=...)
	$(PY) bench/bench_trial_cost.py $(BENCH_TRIAL_COST_ARGS)
