"""The Kubetune trainer: fetch -> validate -> tokenize -> train -> evaluate -> publish (see README.md)."""

import logging

# On CPUs with AVX512-BF16, importing bitsandbytes (peft does) warns that it could not fetch an optional
# CPU kernel from the Hugging Face Hub. QLoRA runs on GPUs only, and nothing is fetched from a hub here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
