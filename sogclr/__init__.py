"""SogCLR: global contrastive learning with a per-sample moving-average estimator (Yuan et al., ICML 2022).

The algorithm and the entry points stand on top; each folder below is one concern:

    pretrain.py lincls.py export.py imagenet.py   entry points: `python -m sogclr.<name>`
    shards.py                                      an image tree as tar shards: `python -m sogclr.shards`
    losses.py model.py optim.py schedules.py      the algorithm: GlobalContrastiveLoss, SimCLRLoss, ResNet
    distributed.py                                 the process group, gathers, stop signals
    contract/     torch-free: configuration, run layout, state records, atomic writes, the dataset index,
                  shards, the pruning rule. The only part of sogclr that launch/ and jobs/ import.
    data/         datasets read from the index (a tree or shards), position-seeded augmentations, resumable
                  samplers, node-local staging of shards
    training/     the resumable loop, checkpoints, metrics, tracking, watchdog, data check, pruning
    evaluation/   frozen features, kNN, exact global objectives and gradient diagnostics

Imports go one way: entry points -> evaluation, training, data -> the algorithm -> contract. Nothing here
is imported by this file, so `import sogclr.contract` stays free of torch.
"""
