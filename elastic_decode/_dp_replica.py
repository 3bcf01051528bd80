"""`python -m elastic_decode._dp_replica PAYLOAD`: one data-parallel engine replica, an `LLM` of its own
serving the commands of rank 0 until it says stop (distributed/processes.py starts these, `LLM` deals them
their share of each call's prompts; a module of its own so that running it does not import the package's
entry module twice)."""
import sys

import torch

from elastic_decode.distributed.processes import connect, unpack
from elastic_decode.errors import ElasticDecodeError
from elastic_decode.llm import LLM


def replica_main(payload: str) -> int:
    rank, size, port, (kwargs, timeout_s, threads) = unpack(payload)
    torch.set_num_threads(threads)
    device = torch.device(kwargs.get("device") or "cpu")
    if device.type == "cuda":  # its own GPU current from the start (the launchers take their tensors' anyway)
        torch.cuda.set_device(device)
    group = connect(rank, size, port, torch.device("cpu"), timeout_s)

    def answer(fn) -> None:
        try:
            group.send_to(0, ("ok", fn()))
        except ElasticDecodeError as e:  # the user's mistake or the model's state: rank 0 raises it as it is
            group.send_to(0, ("error", (type(e), str(e))))
        except Exception as e:  # noqa: BLE001 - anything else, reported in one line by rank 0
            group.send_to(0, ("error", (ElasticDecodeError, f"{type(e).__name__}: {e}")))

    llm = None

    def start():
        nonlocal llm
        llm = LLM(**kwargs)

    answer(start)
    if llm is None:
        return 1
    try:
        while True:
            command, *args = group.recv_from(0)
            if command == "generate":  # token ids (rank 0 encoded them, and puts its prompts' text back)
                answer(lambda: llm.generate(args[0], args[1], use_tqdm=False))
            elif command == "load":
                answer(lambda: llm.load_weights(args[0]))
            elif command == "sleep":
                answer(llm.sleep)
            elif command == "wake":
                answer(llm.wake_up)
            elif command == "stop":
                llm.close()
                return 0
    except RuntimeError as e:  # rank 0 went away
        print(f"elastic_decode data-parallel replica {rank}: {e}", file=sys.stderr)
        llm.close()
        return 1


if __name__ == "__main__":
    sys.exit(replica_main(sys.argv[1]))
