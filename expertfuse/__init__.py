"""expertfuse: the shared bottom layer every stage package builds on.

The house, bottom to top (enforced by import-linter, see pyproject.toml):

    bench                      measures and reports (imports everything below)
    export                     checkpoint -> model repository (imports train and serve)
    train | serve              independent siblings: train never imports serve, nor serve train
    expertfuse                 errors, CLI runner, the model contract, preprocessing, parity, timing, atomic files

Nothing in this package imports train, serve, export or bench.
"""
