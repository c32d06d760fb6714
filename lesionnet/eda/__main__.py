"""``python -m lesionnet.eda [overrides]``: kept for old commands; the Hydra app is ``lesionnet eda``."""

from lesionnet.cli.eda import main

if __name__ == "__main__":
    main()
