"""``python -m lesionnet.app [overrides]``: kept for old commands; the Hydra app is ``lesionnet serve``."""

from lesionnet.cli.serve import main

if __name__ == "__main__":
    main()
