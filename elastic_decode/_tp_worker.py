"""`python -m elastic_decode._tp_worker PAYLOAD`: one tensor-parallel worker rank (distributed/processes.py
starts these; a module of its own so that running it does not import the package's entry module twice)."""
import sys

from elastic_decode.worker.shard_worker import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
