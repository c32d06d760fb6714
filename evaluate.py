"""Score checkpoints and ensembles: ``python evaluate.py ckpt=... [ensemble=greedy]`` (= ``lesionnet evaluate``)."""

from lesionnet.cli.evaluate import main

if __name__ == "__main__":
    main()
