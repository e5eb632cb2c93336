# `make demo`: a whole FineTuneJob on this machine (hack/demo.py): a tiny base model built from scratch,
# an embedded S3 server (or KUBETUNE_S3_ENDPOINT), a LoRA run and the same question before and after.
.PHONY: demo

DEMO_ARGS ?=

demo: venv ## Fine-tune a tiny model end to end on CPU and compare its answers (a couple of minutes)
	$(PY) hack/demo.py $(DEMO_ARGS)
