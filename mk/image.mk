# The trainer image's locked Python environment (included by the top-level Makefile).
# trainer-image/constraints.txt pins every package of the `trainer` extra; `make venv` and trainer-image/Dockerfile
# install with it. torch is the version of the Dockerfile's pytorch/pytorch base image.
CONSTRAINTS := trainer-image/constraints.txt
BASE_TORCH = $(shell sed -nE 's|^FROM pytorch/pytorch:([0-9.]+)-.*|\1|p' trainer-image/Dockerfile)

.PHONY: constraints

constraints: venv ## Re-lock trainer-image/constraints.txt (torch: the image base's; UPGRADE=1: newest of the rest)
	@test -n "$(BASE_TORCH)" || { echo "no FROM pytorch/pytorch:<torch>-... in trainer-image/Dockerfile" >&2; exit 1; }
	@mkdir -p .work
	echo "torch==$(BASE_TORCH)" > .work/base-torch.txt
	cp $(CONSTRAINTS) .work/constraints.txt  # uv keeps the pins it finds there unless UPGRADE is set
	$(VENV)/bin/uv pip compile pyproject.toml --extra trainer --extra peers --universal --fork-strategy fewest \
	  --constraint .work/base-torch.txt --annotation-style line --no-header $(if $(UPGRADE),--upgrade) \
	  --quiet -o .work/constraints.txt
	{ printf '%s\n' \
	  "# The trainer image's Python packages, the single source of their versions: the project's dependencies and" \
	  "# its \`trainer\` extra for every platform (one version each). \`make venv\` and trainer-image/Dockerfile install" \
	  "# with it as constraints; tests/trainer/test_image_env.py trains in a fresh venv made from it." \
	  "# The \`peers\` extra (trl, datasets: test-only, never in the image) is pinned here too, with the versions the" \
	  "# suite was last green with; docs/testing.md says how to move them." \
	  "# torch is the trainer image base's version. torch's own CUDA wheels (nvidia-*, cuda-*, triton) are left out:" \
	  "# torch pins them exactly, and in the image they are those of the base's torch build." \
	  "# Regenerate with \`make constraints\` (keeps every pin that still resolves; UPGRADE=1 takes the newest)," \
	  "# after changing the base image in trainer-image/Dockerfile or a bound in pyproject.toml."; \
	  awk '/^nvidia-ml-py==/ || !/^(cuda-|nvidia-|triton==)/' .work/constraints.txt; } > $(CONSTRAINTS)
