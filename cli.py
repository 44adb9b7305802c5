"""Repo-root entry point: `python cli.py --help` runs the same app as the installed `tinybert` command."""

from tinybert.cli import main

if __name__ == "__main__":
    main()
