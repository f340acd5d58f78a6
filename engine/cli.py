"""What every tool shares: config overrides on the command line, and one clear line for our errors."""
import argparse
import sys

from .errors import ToolkitError


def parser_for(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def run(main, argv=None) -> int:
    """Call `main(argv)`; a ToolkitError becomes `error: <message>` on stderr and exit status 2,
    instead of a traceback from deep inside the library."""
    try:
        return main(argv) or 0
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
