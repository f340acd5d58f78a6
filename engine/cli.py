"""What every tool shares: config overrides on the command line, and one clear line for our errors."""
import argparse
import sys

from . import distributed
from .errors import ToolkitError, TrainingInterrupted


def parser_for(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def run(main, argv=None) -> int:
    """Call `main(argv)`; a ToolkitError becomes `error: <message>` on stderr and exit status 2,
    instead of a traceback from deep inside the library. Training stopped by SIGTERM or Ctrl-C (after
    saving a checkpoint) exits with 128 + the signal number, as the shell reports a killed process.
    In a distributed run the messages name the rank, and the process group is closed at the end."""
    try:
        return main(argv) or 0
    except TrainingInterrupted as e:
        print(f"stopped: {distributed.rank_prefix()}{e}", file=sys.stderr)
        return 128 + e.signum  # the shell's status for a process ended by that signal
    except ToolkitError as e:
        print(f"error: {distributed.rank_prefix()}{message(e)}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


def message(error: Exception) -> str:
    """The error's own message. An error raised in a DataLoader worker comes back re-raised with the
    worker's traceback as its text; the message is what follows the error's name on its last line."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    marker = f"{type(error).__name__}: "
    return text[text.rindex(marker) + len(marker):].strip() if marker in text else text
