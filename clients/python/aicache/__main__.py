"""`python -m aicache <command>`: the client's command-line tools."""
import sys

USAGE = """usage: python -m aicache <command> [options]

commands:
  preload   warm a namespace from a CSV, JSON lines, query log or chat requests file
            (python -m aicache preload --help)
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] == "preload":
        # Imported on demand: the package must not need the tools' deps.
        from .preload import main as preload
        return preload(argv[1:])
    print(f"python -m aicache: unknown command {argv[0]!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
