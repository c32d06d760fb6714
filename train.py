"""Train a LesionNet model: ``python train.py [model=...] [data.root=...] [experiment=...]`` (= ``lesionnet train``)."""

from lesionnet.cli.train import main

if __name__ == "__main__":
    main()
