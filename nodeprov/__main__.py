"""``python -m nodeprov``: the ``nodeprov`` command (how the supervisor starts its workers)."""

from nodeprov.cli import main

if __name__ == "__main__":
    main()
