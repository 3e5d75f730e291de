"""``python -m llmsample``."""

from llmsample.cli import entry

if __name__ == "__main__":
    entry()
