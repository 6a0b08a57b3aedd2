"""`python -m fusion_cli ...`: the same as the `fusion` command."""

from fusion_cli.cli.main import main

if __name__ == "__main__":
    main()
