"""`python -m elastic_decode._dp_replica PAYLOAD`: one data-parallel engine replica (parallel.py starts
these; a module of its own so that running it does not import the package's entry module twice)."""
import sys

from elastic_decode.parallel import replica_main

if __name__ == "__main__":
    sys.exit(replica_main(sys.argv[1]))
