"""Command line: `llm-worker run | check-config | submit | queues | simulate | plugins`."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "simulate":
        from llm_worker import simulator
        return simulator.main(argv[1:])
    print("llm-worker: not yet", file=sys.stderr)
    return 2
