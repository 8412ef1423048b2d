import os

# Triton kernels launch only under the interpreter on a CPU-only host; this must be set before any
# kernel module is imported (ENVIRONMENT.md: "set before the kernels are defined").
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
