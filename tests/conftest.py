import os

# Keep torch single-threaded in the test process: the machine has 2 cores shared with the
# Ray actors the integration tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
